//! Tolerant parsing of Meta's webhook notifications (CLOUD_API.md §4–§6)
//! into typed inbound events.
//!
//! The envelope must be a WhatsApp notification; below it nothing is an
//! error: unknown fields are ignored, unknown message types become
//! `unsupported`, and an item that cannot be read at all is counted and
//! skipped without failing its neighbours.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::domain::{Millis, now_ms};
use crate::inbound::{InboundKind, InboundMessage, ReplyChoice, StatusUpdate};
use crate::message::Object;

/// Why a body is not a WhatsApp notification (→ 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("the body is not valid JSON: {0}")]
    NotJson(String),
    #[error("not a WhatsApp Business Account notification: {0}")]
    NotWhatsApp(String),
}

/// The messages and statuses of one `changes[].value` (one business number).
#[derive(Debug, Default)]
pub struct Batch {
    pub phone_number_id: String,
    /// `metadata.display_phone_number` ("" when absent).
    pub display_phone_number: String,
    pub messages: Vec<InboundMessage>,
    pub statuses: Vec<StatusUpdate>,
}

/// A whole notification.
#[derive(Debug, Default)]
pub struct Notification {
    pub batches: Vec<Batch>,
    /// Account-level changes (templates, quality, account updates, user
    /// preferences), as Meta sent them.
    pub account_changes: Vec<AccountChange>,
    /// Changes of other fields, not read.
    pub other_fields: usize,
    /// Items that could not be read (no id, wrong shapes).
    pub malformed: usize,
}

#[derive(Deserialize)]
struct EnvelopeIn<'a> {
    #[serde(borrow)]
    object: Cow<'a, str>,
    #[serde(borrow)]
    entry: Vec<EntryIn<'a>>,
}

#[derive(Deserialize)]
struct EntryIn<'a> {
    /// The WhatsApp Business Account id.
    #[serde(default)]
    id: Option<String>,
    #[serde(default, borrow)]
    changes: Vec<ChangeIn<'a>>,
}

/// The account-level webhook fields the router reads (CLOUD_API.md §4).
pub const ACCOUNT_FIELDS: &[&str] = &[
    "message_template_status_update",
    "message_template_quality_update",
    "template_category_update",
    "phone_number_quality_update",
    "account_update",
    "user_preferences",
    "user_id_update",
];

/// One account-level change.
#[derive(Debug, Clone)]
pub struct AccountChange {
    /// Meta's webhook field, one of [`ACCOUNT_FIELDS`].
    pub field: String,
    /// The WhatsApp Business Account id (`entry[].id`).
    pub waba_id: Option<String>,
    /// `value.metadata.phone_number_id`, where Meta gives one.
    pub phone_number_id: Option<String>,
    pub value: Value,
}

impl AccountChange {
    /// A change about a number's contacts that names the number (a
    /// marketing preference, a new BSUID): in a cluster it goes to the
    /// number's lease holder in order with the number's messages.
    pub fn per_number(&self) -> bool {
        self.phone_number_id.is_some()
            && matches!(self.field.as_str(), "user_preferences" | "user_id_update")
    }

    /// The entries of a `user_id_update` (none for other fields): the
    /// contact's phone number when Meta gives it, the previous and the
    /// current BSUID. Entries without both BSUIDs are skipped.
    pub fn user_id_updates(&self) -> impl Iterator<Item = (Option<&str>, &str, &str)> {
        fn text<'v>(v: &'v Value, k: &str) -> Option<&'v str> {
            v.get(k)?.as_str().filter(|s| !s.is_empty())
        }
        let entries = match self.field.as_str() {
            "user_id_update" => self.value["user_id_update"].as_array(),
            _ => None,
        };
        entries.into_iter().flatten().filter_map(move |u| {
            let ids = u.get("user_id")?;
            Some((
                text(u, "wa_id"),
                text(ids, "previous")?,
                text(ids, "current")?,
            ))
        })
    }
}

#[derive(Deserialize)]
struct ChangeIn<'a> {
    #[serde(default, borrow)]
    field: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    value: Option<&'a RawValue>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ValueIn<'a> {
    metadata: Option<MetadataIn>,
    contacts: Vec<ContactIn>,
    #[serde(borrow)]
    messages: Vec<&'a RawValue>,
    #[serde(borrow)]
    statuses: Vec<&'a RawValue>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct MetadataIn {
    phone_number_id: Option<String>,
    display_phone_number: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ContactIn {
    profile: Option<ProfileIn>,
    wa_id: Option<String>,
    user_id: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ProfileIn {
    name: Option<String>,
    username: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct MessageIn {
    from: Option<String>,
    from_user_id: Option<String>,
    id: Option<String>,
    timestamp: Option<Value>,
    #[serde(rename = "type")]
    kind: Option<String>,
    context: Option<ContextIn>,
    text: Option<TextIn>,
    image: Option<MediaIn>,
    video: Option<MediaIn>,
    document: Option<MediaIn>,
    interactive: Option<InteractiveIn>,
    button: Option<ButtonIn>,
    order: Option<OrderIn>,
}

/// The fields every message has, for messages whose content cannot be read.
#[derive(Deserialize, Default)]
#[serde(default)]
struct MinimalIn {
    from: Option<String>,
    from_user_id: Option<String>,
    id: Option<String>,
    timestamp: Option<Value>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ContextIn {
    id: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct TextIn {
    body: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct MediaIn {
    caption: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct InteractiveIn {
    #[serde(rename = "type")]
    kind: Option<String>,
    button_reply: Option<ReplyIn>,
    list_reply: Option<ReplyIn>,
    nfm_reply: Option<NfmIn>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ReplyIn {
    id: Option<String>,
    title: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct NfmIn {
    name: Option<String>,
    body: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ButtonIn {
    payload: Option<String>,
    text: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct OrderIn {
    text: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct StatusIn {
    id: Option<String>,
    status: Option<String>,
    timestamp: Option<Value>,
    recipient_id: Option<String>,
    /// The contact's BSUID, alone when the phone number is hidden.
    recipient_user_id: Option<String>,
    errors: Vec<ErrorIn>,
    pricing: Option<Box<RawValue>>,
    conversation: Option<Box<RawValue>>,
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ErrorIn {
    code: Option<i64>,
    title: Option<String>,
    message: Option<String>,
}

/// Meta's unix-seconds timestamp (a string, or a number) in ms.
fn timestamp_ms(v: &Option<Value>) -> Option<Millis> {
    let secs = match v.as_ref()? {
        Value::String(s) => s.trim().parse::<i64>().ok()?,
        Value::Number(n) => n.as_i64()?,
        _ => return None,
    };
    secs.checked_mul(1000)
}

/// Parse a notification body (already signature-checked).
pub fn parse(body: &[u8]) -> Result<Notification, ParseError> {
    // JSON is UTF-8 (RFC 8259 §8.1). Checked once over the whole body:
    // the parser below skips the strings it ignores without looking inside.
    let body = std::str::from_utf8(body)
        .map_err(|e| ParseError::NotJson(format!("the body is not UTF-8: {e}")))?;
    let env: EnvelopeIn<'_> = serde_json::from_str(body).map_err(|e| {
        if e.is_data() {
            ParseError::NotWhatsApp(e.to_string())
        } else {
            ParseError::NotJson(e.to_string())
        }
    })?;
    if env.object != "whatsapp_business_account" {
        return Err(ParseError::NotWhatsApp(format!(
            "object is {:?}",
            env.object
        )));
    }
    let mut out = Notification::default();
    let now = now_ms();
    for entry in env.entry {
        for change in entry.changes {
            let field = change.field.as_deref().unwrap_or("messages");
            if field != "messages" {
                match change
                    .value
                    .map(|raw| serde_json::from_str::<Value>(raw.get()))
                {
                    Some(Ok(value)) if value.is_object() && ACCOUNT_FIELDS.contains(&field) => {
                        out.account_changes.push(AccountChange {
                            field: field.to_string(),
                            waba_id: entry.id.clone(),
                            phone_number_id: value["metadata"]["phone_number_id"]
                                .as_str()
                                .map(str::to_string),
                            value,
                        });
                    }
                    Some(Ok(_)) | None => out.other_fields += 1,
                    Some(Err(_)) => out.malformed += 1,
                }
                continue;
            }
            let Some(raw) = change.value else {
                out.malformed += 1;
                continue;
            };
            let Ok(value) = serde_json::from_str::<ValueIn<'_>>(raw.get()) else {
                out.malformed += 1;
                continue;
            };
            let metadata = value.metadata.unwrap_or_default();
            let Some(pnid) = metadata.phone_number_id.filter(|p| !p.is_empty()) else {
                out.malformed += 1;
                continue;
            };
            let mut batch = Batch {
                phone_number_id: pnid,
                display_phone_number: metadata.display_phone_number.unwrap_or_default(),
                ..Batch::default()
            };
            for raw in value.messages {
                match message(raw, &value.contacts, now) {
                    Some(m) => batch.messages.push(m),
                    None => out.malformed += 1,
                }
            }
            for raw in value.statuses {
                match status(raw) {
                    Some(s) => batch.statuses.push(s),
                    None => out.malformed += 1,
                }
            }
            out.batches.push(batch);
        }
    }
    Ok(out)
}

fn status(raw: &RawValue) -> Option<StatusUpdate> {
    let s: StatusIn = serde_json::from_str(raw.get()).ok()?;
    let error = s.errors.first().map(|e| {
        (
            e.code.unwrap_or(0),
            e.title
                .clone()
                .or_else(|| e.message.clone())
                .unwrap_or_default(),
        )
    });
    Some(StatusUpdate {
        wamid: s.id.filter(|i| !i.is_empty())?.into(),
        status: s.status?,
        timestamp: timestamp_ms(&s.timestamp).unwrap_or(0),
        recipient: s.recipient_id.or(s.recipient_user_id).map(Into::into),
        error,
        pricing: s.pricing.and_then(Object::from_raw),
        conversation: s.conversation.and_then(Object::from_raw),
    })
}

fn message(raw: &RawValue, contacts: &[ContactIn], now: Millis) -> Option<InboundMessage> {
    let full: Option<MessageIn> = serde_json::from_str(raw.get()).ok();
    let (m, readable) = match full {
        Some(m) => (m, true),
        None => {
            let min: MinimalIn = serde_json::from_str(raw.get()).ok()?;
            (
                MessageIn {
                    from: min.from,
                    from_user_id: min.from_user_id,
                    id: min.id,
                    timestamp: min.timestamp,
                    kind: min.kind,
                    ..MessageIn::default()
                },
                false,
            )
        }
    };
    let wamid = m.id.clone().filter(|i| !i.is_empty())?;
    // SPEC: the contact is the wa_id, or Meta's user_id when no wa_id is given.
    let contact = contacts.iter().find(|c| {
        (m.from.is_some() && c.wa_id == m.from)
            || (m.from_user_id.is_some() && c.user_id == m.from_user_id)
    });
    let contact = contact.or(if contacts.len() == 1 {
        contacts.first()
    } else {
        None
    });
    // The phone number when Meta gives one, else the BSUID.
    let nonempty = |v: &Option<String>| v.clone().filter(|f| !f.is_empty());
    let user_id = nonempty(&m.from_user_id).or_else(|| contact.and_then(|c| nonempty(&c.user_id)));
    let from = nonempty(&m.from)
        .or_else(|| contact.and_then(|c| nonempty(&c.wa_id)))
        .or_else(|| user_id.clone())?;
    let raw_type = m.kind.clone().unwrap_or_else(|| "unknown".into());
    let mut text = None;
    let mut reply = None;
    let choice = |r: &ReplyIn| -> Option<ReplyChoice> {
        Some(ReplyChoice {
            id: r.id.clone()?,
            title: r.title.clone().unwrap_or_default(),
        })
    };
    let kind = if !readable {
        InboundKind::Unsupported
    } else {
        match raw_type.as_str() {
            "text" => {
                text = m.text.as_ref().and_then(|t| t.body.clone());
                InboundKind::Text
            }
            "image" | "video" | "document" => {
                let media = match raw_type.as_str() {
                    "image" => &m.image,
                    "video" => &m.video,
                    _ => &m.document,
                };
                text = media.as_ref().and_then(|x| x.caption.clone());
                InboundKind::parse(&raw_type).unwrap_or(InboundKind::Unsupported)
            }
            "audio" => InboundKind::Audio,
            "sticker" => InboundKind::Sticker,
            "location" => InboundKind::Location,
            "contacts" => InboundKind::Contacts,
            "reaction" => InboundKind::Reaction,
            "order" => {
                text = m.order.as_ref().and_then(|o| o.text.clone());
                InboundKind::Order
            }
            "button" => {
                let b = m.button.as_ref();
                reply = b.and_then(|b| {
                    Some(ReplyChoice {
                        id: b.payload.clone()?,
                        title: b.text.clone().unwrap_or_default(),
                    })
                });
                text = b.and_then(|b| b.text.clone());
                if reply.is_some() {
                    InboundKind::Button
                } else {
                    InboundKind::Unsupported
                }
            }
            "interactive" => {
                let i = m.interactive.as_ref();
                match i.and_then(|i| i.kind.as_deref()) {
                    Some("button_reply") => {
                        reply = i.and_then(|i| i.button_reply.as_ref()).and_then(choice);
                        if reply.is_some() {
                            InboundKind::Button
                        } else {
                            InboundKind::Unsupported
                        }
                    }
                    Some("list_reply") => {
                        reply = i.and_then(|i| i.list_reply.as_ref()).and_then(choice);
                        if reply.is_some() {
                            InboundKind::List
                        } else {
                            InboundKind::Unsupported
                        }
                    }
                    Some("nfm_reply") => {
                        let n = i.and_then(|i| i.nfm_reply.as_ref());
                        text = n.and_then(|n| n.body.clone());
                        let _name = n.and_then(|n| n.name.clone());
                        InboundKind::Flow
                    }
                    _ => InboundKind::Unsupported,
                }
            }
            _ => InboundKind::Unsupported,
        }
    };
    if text.is_none() {
        text = reply.as_ref().map(|r| r.title.clone());
    }
    // CLOUD_API.md §11: only real user messages open or refresh the window;
    // reactions, unsupported and system messages do not (unconfirmed at Meta).
    let opens_window = match kind {
        InboundKind::Reaction => false,
        InboundKind::Unsupported => raw_type == "request_welcome",
        _ => true,
    };
    Some(InboundMessage {
        wamid: wamid.into(),
        from: from.into(),
        contact_name: contact
            .and_then(|c| c.profile.as_ref())
            .and_then(|p| p.name.clone()),
        user_id,
        username: contact
            .and_then(|c| c.profile.as_ref())
            .and_then(|p| nonempty(&p.username)),
        timestamp: timestamp_ms(&m.timestamp).unwrap_or(now),
        kind,
        raw_type,
        text,
        reply,
        context_id: m.context.and_then(|c| c.id).map(Into::into),
        opens_window,
        raw: raw.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/../shared/whatsapp/fixtures/webhooks/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn one(name: &str) -> InboundMessage {
        let n = parse(&fixture(name)).unwrap();
        assert_eq!(n.malformed, 0, "{name}");
        n.batches
            .into_iter()
            .flat_map(|b| b.messages)
            .next()
            .unwrap_or_else(|| panic!("{name}: no message"))
    }

    #[test]
    fn every_fixture_parses() {
        let dir = format!(
            "{}/../shared/whatsapp/fixtures/webhooks",
            env!("CARGO_MANIFEST_DIR")
        );
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let n = parse(&std::fs::read(&path).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(n.malformed, 0, "{}", path.display());
        }
    }

    #[test]
    fn fixture_types_map_to_rule_types() {
        let cases = [
            ("text.json", InboundKind::Text),
            ("image.json", InboundKind::Image),
            ("video.json", InboundKind::Video),
            ("audio_voice.json", InboundKind::Audio),
            ("document.json", InboundKind::Document),
            ("sticker.json", InboundKind::Sticker),
            ("location.json", InboundKind::Location),
            ("contacts.json", InboundKind::Contacts),
            ("interactive_button_reply.json", InboundKind::Button),
            ("interactive_list_reply.json", InboundKind::List),
            ("interactive_nfm_reply.json", InboundKind::Flow),
            ("template_button.json", InboundKind::Button),
            ("reaction.json", InboundKind::Reaction),
            ("order.json", InboundKind::Order),
            ("system.json", InboundKind::Unsupported),
            ("unsupported.json", InboundKind::Unsupported),
            ("referral_ad.json", InboundKind::Text),
        ];
        for (name, kind) in cases {
            assert_eq!(one(name).kind, kind, "{name}");
        }
        let b = one("interactive_button_reply.json");
        assert!(b.reply.is_some() && b.context_id.is_some());
        assert!(!one("reaction.json").opens_window);
        assert!(one("text.json").contact_name.is_some());
    }

    #[test]
    fn system_messages_name_the_contact_s_new_ids() {
        use crate::inbound::IdentityChange;
        assert_eq!(
            one("system.json").identity_change(),
            Some(IdentityChange::Number {
                wa_id: "16315550147".into(),
                user_id: Some("US.77120394856601928374".into()),
            })
        );
        assert_eq!(one("text.json").identity_change(), None);
        let with = |system: &str| {
            let body = format!(
                r#"{{"object":"whatsapp_business_account","entry":[{{"id":"1","changes":[{{"field":"messages","value":{{"metadata":{{"phone_number_id":"1"}},"messages":[{{"from":"15551234567","id":"wamid.X","timestamp":"1","type":"system","system":{system}}}]}}}}]}}]}}"#
            );
            parse(body.as_bytes()).unwrap().batches[0].messages[0].identity_change()
        };
        assert_eq!(
            with(r#"{"type":"user_changed_user_id","user_id":"US.1"}"#),
            Some(IdentityChange::UserId("US.1".into()))
        );
        for unknown in [
            r#"{"type":"customer_identity_changed","identity":"x"}"#,
            r#"{"type":"user_changed_number","wa_id":""}"#,
            r#"{"type":"user_changed_user_id"}"#,
            r#"{"body":"no type"}"#,
        ] {
            assert_eq!(with(unknown), None, "{unknown}");
        }
    }

    #[test]
    fn batches_and_statuses() {
        let n = parse(&fixture("batch_multi_entry.json")).unwrap();
        let messages: usize = n.batches.iter().map(|b| b.messages.len()).sum();
        let statuses: usize = n.batches.iter().map(|b| b.statuses.len()).sum();
        assert_eq!((messages, statuses), (4, 4));
        let failed = parse(&fixture("status_failed.json")).unwrap();
        let s = &failed.batches[0].statuses[0];
        assert_eq!(s.status, "failed");
        assert_eq!(s.error.as_ref().map(|e| e.0), Some(131047));
    }

    #[test]
    fn account_level_fields_are_read_and_others_counted() {
        let n = parse(&fixture("template_status_update.json")).unwrap();
        assert!(n.batches.is_empty());
        assert_eq!(n.account_changes.len(), 2);
        let c = &n.account_changes[1];
        assert_eq!(c.field, "message_template_status_update");
        assert_eq!(c.waba_id.as_deref(), Some("310298475561023"));
        assert_eq!(c.value["event"], "REJECTED");
        let other = br#"{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[{"field":"smb_app_state_sync","value":{}}]}]}"#;
        let n = parse(other).unwrap();
        assert_eq!((n.other_fields, n.account_changes.len()), (1, 0));
        let update = br#"{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[{"field":"user_id_update","value":{"messaging_product":"whatsapp","metadata":{"phone_number_id":"7"},"user_id_update":[]}}]}]}"#;
        let n = parse(update).unwrap();
        assert_eq!(n.account_changes[0].phone_number_id.as_deref(), Some("7"));
    }

    #[test]
    fn bad_bodies_are_errors_and_odd_items_are_skipped() {
        assert!(matches!(parse(b"not json"), Err(ParseError::NotJson(_))));
        // Invalid UTF-8 in a string the parser would otherwise skip.
        let mut bad = br#"{"object":"whatsapp_business_account","entry":[],"x":""#.to_vec();
        bad.extend_from_slice(&[0xff, 0xfe]);
        bad.extend_from_slice(br#""}"#);
        assert!(matches!(parse(&bad), Err(ParseError::NotJson(e)) if e.contains("UTF-8")));
        assert!(matches!(parse(b"[1,2]"), Err(ParseError::NotWhatsApp(_))));
        assert!(matches!(
            parse(br#"{"object":"page","entry":[]}"#),
            Err(ParseError::NotWhatsApp(_))
        ));
        assert!(parse(br#"{"object":"whatsapp_business_account","entry":["#).is_err());
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert!(parse(deep.as_bytes()).is_err());
        let odd = br#"{"object":"whatsapp_business_account","entry":[{"changes":[{"field":"messages","value":{
            "metadata":{"phone_number_id":"1"},
            "messages":[{"id":"wamid.a","from":"15551234567","timestamp":"1","type":"text","text":{"body":42}},
                        {"from":"15551234567","type":"text"},
                        {"id":"wamid.b","from":"15551234567","timestamp":"1","type":"hologram","hologram":{}}]}}]}]}"#;
        let n = parse(odd).unwrap();
        assert_eq!(n.malformed, 1, "the message without an id");
        let kinds: Vec<_> = n.batches[0].messages.iter().map(|m| m.kind).collect();
        assert_eq!(
            kinds,
            vec![InboundKind::Unsupported, InboundKind::Unsupported]
        );
    }
}
