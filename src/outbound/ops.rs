//! What the outbox writes to the journal ([`crate::persist`] format 1,
//! owner `o`), as wire types of their own. `Record` and `ForgetRecord`
//! have the shapes of format 0 (statuses written `Queued`, `Sent` …);
//! `Update` is new: a status change writes the record's changing fields,
//! not its content, tags and metadata again.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use super::{Content, OutboundRecord, RecordError, Status};
use crate::domain::Millis;
use crate::message::MessageType;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum OutboxOp<'a> {
    /// A whole record (new records, snapshots).
    Record(Box<RecordWire<'a>>),
    /// The changing fields of a record (an upsert of those fields).
    Update(Box<UpdateWire<'a>>),
    /// A record past retention or `max_records` was dropped.
    ForgetRecord { id: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordWire<'a> {
    pub id: Cow<'a, str>,
    pub account: Cow<'a, str>,
    pub to: Cow<'a, str>,
    pub content: ContentWire<'a>,
    pub status: StatusWire,
    pub wamid: Option<Cow<'a, str>>,
    pub source: Cow<'a, str>,
    pub tags: Cow<'a, [String]>,
    pub metadata: Option<Cow<'a, crate::message::Object>>,
    pub attempts: u32,
    pub error: Option<ErrorWire>,
    pub history: Vec<(StatusWire, Millis)>,
    pub created_at: Millis,
    pub send_at: Option<Millis>,
    pub expires_at: Millis,
    pub bypass_consent: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub typing: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pricing: Option<Cow<'a, crate::message::Object>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation: Option<Cow<'a, crate::message::Object>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpdateWire<'a> {
    pub id: Cow<'a, str>,
    pub status: StatusWire,
    pub wamid: Option<Cow<'a, str>>,
    pub attempts: u32,
    pub error: Option<ErrorWire>,
    pub history: Vec<(StatusWire, Millis)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pricing: Option<Cow<'a, crate::message::Object>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation: Option<Cow<'a, crate::message::Object>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContentWire<'a> {
    /// Meta's type name (`text`, `template` …).
    pub kind: MessageType,
    pub object: Cow<'a, crate::message::Object>,
    pub context_id: Option<Cow<'a, str>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorWire {
    pub code: String,
    pub graph_code: Option<i64>,
    pub message: String,
}

/// A status on disk: its SPEC name capitalised (`Queued`), as format 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct StatusWire(pub Status);

impl Serialize for StatusWire {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Written with every journaled change of a record: formatted
        // straight into the output, no String.
        serializer.collect_str(&Capitalized(self.0.as_str()))
    }
}

/// A name with its first letter upper case.
struct Capitalized(&'static str);

impl std::fmt::Display for Capitalized {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::fmt::Write;
        let mut chars = self.0.chars();
        if let Some(first) = chars.next() {
            f.write_char(first.to_ascii_uppercase())?;
        }
        f.write_str(chars.as_str())
    }
}

impl TryFrom<String> for StatusWire {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Status::parse(&s.to_ascii_lowercase())
            .map(StatusWire)
            .ok_or_else(|| format!("unknown status {s:?}"))
    }
}

fn error_wire(e: &RecordError) -> ErrorWire {
    ErrorWire {
        code: e.code.clone(),
        graph_code: e.graph_code,
        message: e.message.clone(),
    }
}

fn error_of(e: ErrorWire) -> RecordError {
    RecordError {
        code: e.code,
        graph_code: e.graph_code,
        message: e.message,
    }
}

fn history_wire(r: &OutboundRecord) -> Vec<(StatusWire, Millis)> {
    r.history
        .iter()
        .map(|&(s, at)| (StatusWire(s), at))
        .collect()
}

/// A view of the record, for writing it (nothing copied but its history).
impl<'a> From<&'a OutboundRecord> for RecordWire<'a> {
    fn from(r: &'a OutboundRecord) -> Self {
        let text = |s: &'a str| Cow::Borrowed(s);
        RecordWire {
            id: text(&r.id),
            account: text(&r.account),
            to: text(&r.to),
            content: ContentWire {
                kind: r.content.kind,
                object: Cow::Borrowed(&r.content.object),
                context_id: r.content.context_id.as_deref().map(text),
            },
            status: StatusWire(r.status),
            wamid: r.wamid.as_deref().map(text),
            source: text(&r.source),
            tags: Cow::Borrowed(&r.tags),
            metadata: r.metadata.as_ref().map(Cow::Borrowed),
            attempts: r.attempts,
            error: r.error.as_ref().map(error_wire),
            history: history_wire(r),
            created_at: r.created_at,
            send_at: r.send_at,
            expires_at: r.expires_at,
            bypass_consent: r.bypass_consent,
            typing: r.typing.as_deref().map(text),
            pricing: r.pricing.as_ref().map(Cow::Borrowed),
            conversation: r.conversation.as_ref().map(Cow::Borrowed),
        }
    }
}

impl From<RecordWire<'_>> for OutboundRecord {
    fn from(r: RecordWire<'_>) -> Self {
        OutboundRecord {
            id: r.id.into_owned().into(),
            account: r.account.into_owned().into(),
            to: r.to.into_owned().into(),
            content: Content {
                kind: r.content.kind,
                object: r.content.object.into_owned(),
                context_id: r.content.context_id.map(|c| c.into_owned().into()),
            },
            status: r.status.0,
            wamid: r.wamid.map(|w| w.into_owned().into()),
            source: r.source.into_owned(),
            tags: r.tags.into_owned(),
            metadata: r.metadata.map(Cow::into_owned),
            attempts: r.attempts,
            error: r.error.map(error_of),
            history: r.history.into_iter().map(|(s, at)| (s.0, at)).collect(),
            created_at: r.created_at,
            send_at: r.send_at,
            expires_at: r.expires_at,
            bypass_consent: r.bypass_consent,
            typing: r.typing.map(|t| t.into_owned().into()),
            pricing: r.pricing.map(Cow::into_owned),
            conversation: r.conversation.map(Cow::into_owned),
        }
    }
}

/// A view of the record's changing fields, for writing them.
impl<'a> From<&'a OutboundRecord> for UpdateWire<'a> {
    fn from(r: &'a OutboundRecord) -> Self {
        UpdateWire {
            id: Cow::Borrowed(&r.id),
            status: StatusWire(r.status),
            wamid: r.wamid.as_deref().map(Cow::Borrowed),
            attempts: r.attempts,
            error: r.error.as_ref().map(error_wire),
            history: history_wire(r),
            pricing: r.pricing.as_ref().map(Cow::Borrowed),
            conversation: r.conversation.as_ref().map(Cow::Borrowed),
        }
    }
}

impl UpdateWire<'_> {
    /// Apply onto the record it names.
    pub fn apply(self, r: &mut OutboundRecord) {
        r.status = self.status.0;
        r.wamid = self.wamid.map(|w| w.into_owned().into());
        r.attempts = self.attempts;
        r.error = self.error.map(error_of);
        r.history = self.history.into_iter().map(|(s, at)| (s.0, at)).collect();
        if self.pricing.is_some() {
            r.pricing = self.pricing.map(Cow::into_owned);
        }
        if self.conversation.is_some() {
            r.conversation = self.conversation.map(Cow::into_owned);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_written_as_format_zero_wrote_them() {
        for s in Status::ALL {
            let json = serde_json::to_string(&StatusWire(s)).unwrap();
            let debug = format!("\"{s:?}\"");
            assert_eq!(json, debug);
            assert_eq!(serde_json::from_str::<StatusWire>(&json).unwrap().0, s);
        }
        assert!(serde_json::from_str::<StatusWire>("\"Lost\"").is_err());
    }

    #[test]
    fn an_update_is_small_and_applies_the_changing_fields() {
        let mut r = OutboundRecord {
            id: "msg_1".into(),
            account: "main".into(),
            to: "1".into(),
            content: Content {
                kind: MessageType::Text,
                object: serde_json::json!({ "body": "x".repeat(4000) }).into(),
                context_id: None,
            },
            status: Status::Queued,
            wamid: None,
            source: "api".into(),
            tags: vec![],
            metadata: None,
            attempts: 0,
            error: None,
            history: vec![(Status::Queued, 1)],
            created_at: 1,
            send_at: None,
            expires_at: 10,
            bypass_consent: false,
            typing: None,
            pricing: None,
            conversation: None,
        };
        let mut sent = r.clone();
        sent.set_status(Status::Sent, 2);
        sent.wamid = Some("wamid.1".into());
        let update = UpdateWire::from(&sent);
        assert!(serde_json::to_vec(&update).unwrap().len() < 200);
        update.apply(&mut r);
        assert_eq!(
            (r.status, r.wamid.as_deref()),
            (Status::Sent, Some("wamid.1"))
        );
        assert_eq!(r.history.len(), 2);
    }
}
