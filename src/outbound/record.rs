//! The outbound record and its status machine (SPEC §6):
//! `scheduled → queued → sending → sent → delivered → read`, or a final
//! `failed`, `expired` or `cancelled`. Statuses never move backwards.

use crate::message::Object;

use super::Content;
use crate::domain::Millis;
use crate::ids::{AccountName, ContactId, MessageId, Wamid};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Status {
    Scheduled,
    Queued,
    Sending,
    Sent,
    Delivered,
    Read,
    Failed,
    Expired,
    Cancelled,
}

impl Status {
    pub const ALL: [Status; 9] = [
        Status::Scheduled,
        Status::Queued,
        Status::Sending,
        Status::Sent,
        Status::Delivered,
        Status::Read,
        Status::Failed,
        Status::Expired,
        Status::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Scheduled => "scheduled",
            Status::Queued => "queued",
            Status::Sending => "sending",
            Status::Sent => "sent",
            Status::Delivered => "delivered",
            Status::Read => "read",
            Status::Failed => "failed",
            Status::Expired => "expired",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|x| x.as_str() == s)
    }

    /// Progress of a message that has not ended badly.
    fn rank(self) -> u8 {
        match self {
            Status::Scheduled | Status::Queued => 0,
            Status::Sending => 1,
            Status::Sent => 2,
            Status::Delivered => 3,
            Status::Read => 4,
            Status::Failed | Status::Expired | Status::Cancelled => 5,
        }
    }

    /// Failed, expired or cancelled: nothing more happens to it.
    pub fn is_final(self) -> bool {
        matches!(self, Status::Failed | Status::Expired | Status::Cancelled)
    }

    /// Out of the queue and not being sent: the record may be dropped
    /// (retention, `max_records`) without losing work.
    pub fn is_settled(self) -> bool {
        !matches!(self, Status::Queued | Status::Scheduled | Status::Sending)
    }

    /// Whether a delivery status from Meta may move a message from `self`
    /// to `next` (SPEC §3: never backwards; §6: late failures apply).
    pub fn accepts_from_meta(self, next: Status) -> bool {
        match next {
            Status::Sent | Status::Delivered | Status::Read => {
                !self.is_final() && next.rank() > self.rank()
            }
            Status::Failed => matches!(self, Status::Sending | Status::Sent | Status::Delivered),
            _ => false,
        }
    }
}

/// Why a record failed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RecordError {
    /// `window_closed`, `opted_out`, `graph_error`, `invalid_message`, …
    pub code: String,
    pub graph_code: Option<i64>,
    pub message: String,
}

/// One outbound message and everything that happened to it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct OutboundRecord {
    pub id: MessageId,
    pub account: AccountName,
    pub to: ContactId,
    pub content: Content,
    pub status: Status,
    pub wamid: Option<Wamid>,
    /// `api` or `rule:NAME`.
    pub source: String,
    pub tags: Vec<String>,
    pub metadata: Option<Object>,
    pub attempts: u32,
    pub error: Option<RecordError>,
    pub history: Vec<(Status, Millis)>,
    pub created_at: Millis,
    /// When it may be sent (scheduled messages).
    pub send_at: Option<Millis>,
    /// Not sent by then → expired.
    pub expires_at: Millis,
    /// Consent replies go out even to a contact who just opted out.
    pub bypass_consent: bool,
    /// Show the contact a typing indicator on this inbound message right
    /// before the first attempt (CLOUD_API.md §7.5; it also marks it read).
    pub typing: Option<Wamid>,
    /// Meta's `pricing` of this message, the latest a status carried.
    pub pricing: Option<Object>,
    /// Meta's `conversation` object, the latest a status carried.
    pub conversation: Option<Object>,
}

impl OutboundRecord {
    /// Move to `status` now, recording it in the history.
    pub fn set_status(&mut self, status: Status, at: Millis) {
        self.status = status;
        self.history.push((status, at));
    }
}

#[cfg(test)]
mod tests {
    use super::Status::*;

    #[test]
    fn meta_statuses_never_move_backwards() {
        assert!(Sent.accepts_from_meta(Delivered));
        assert!(Sent.accepts_from_meta(Read));
        assert!(!Read.accepts_from_meta(Sent));
        assert!(!Read.accepts_from_meta(Delivered));
        assert!(!Delivered.accepts_from_meta(Delivered));
        assert!(Sending.accepts_from_meta(Sent));
    }

    #[test]
    fn late_failures_apply_but_final_states_stay() {
        assert!(Sent.accepts_from_meta(Failed));
        assert!(Delivered.accepts_from_meta(Failed));
        assert!(!Read.accepts_from_meta(Failed));
        assert!(!Cancelled.accepts_from_meta(Sent));
        assert!(!Failed.accepts_from_meta(Delivered));
    }

    #[test]
    fn any_order_of_statuses_ends_at_the_highest() {
        let orders = [
            [Sent, Delivered, Read],
            [Read, Sent, Delivered],
            [Delivered, Read, Sent],
            [Read, Delivered, Sent],
        ];
        for order in orders {
            let mut s = Sending;
            for next in order {
                if s.accepts_from_meta(next) {
                    s = next;
                }
            }
            assert_eq!(s, Read, "order {order:?}");
        }
    }
}
