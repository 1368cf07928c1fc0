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
    pub object: Object,
    /// The message this one quotes.
    pub context_id: Option<Wamid>,
}

/// A JSON object kept as its text: the object of a [`Content`] (checked
/// by [`validate`]), Meta's `pricing` and `conversation` of a send, an API
/// send's `metadata`. What the router does with them is write them (to
/// Meta, the journal, the archive, events), which copies the text, and
/// hold them while a record is in memory, in a fraction of a tree's
/// memory. Read as a tree only where an API answer shows one.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Object(Box<serde_json::value::RawValue>);

impl Object {
    /// The JSON of `value`.
    pub fn new(value: &Value) -> Self {
        // A `Value` always serializes.
        Object(serde_json::value::to_raw_value(value).expect("a JSON value serializes"))
    }

    /// Meta's JSON as it came, if it is an object.
    pub fn from_raw(raw: Box<serde_json::value::RawValue>) -> Option<Self> {
        raw.get().starts_with('{').then_some(Object(raw))
    }

    /// The object as a tree.
    pub fn to_value(&self) -> Value {
        serde_json::from_str(self.0.get()).unwrap_or(Value::Null)
    }

    /// The JSON text.
    pub fn json(&self) -> &str {
        self.0.get()
    }

    /// Only the fields `T` names, read from the text.
    pub fn read<'a, T: serde::Deserialize<'a> + Default>(&'a self) -> T {
        serde_json::from_str(self.0.get()).unwrap_or_default()
    }
}

impl From<Value> for Object {
    fn from(value: Value) -> Self {
        Object::new(&value)
    }
}

/// The same JSON: the same text, or the same tree (Meta may order the
/// keys of one object differently from one status to the next).
impl PartialEq for Object {
    fn eq(&self, other: &Self) -> bool {
        self.json() == other.json() || self.to_value() == other.to_value()
    }
}

impl std::fmt::Debug for Object {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.json())
    }
}

impl Content {
    /// Templates are the only messages allowed outside the window (SPEC §6).
    pub fn is_template(&self) -> bool {
        self.kind == MessageType::Template
    }

    /// A short text for conversation history: body, caption or template name.
    pub fn summary(&self) -> Option<String> {
        use std::borrow::Cow;
        // One field read from the text (borrowed unless it has escapes);
        // the rest is skipped. Not a string there: no summary.
        macro_rules! one_field {
            ($name:ident, $field:ident) => {
                #[derive(Default, serde::Deserialize)]
                struct $name<'a> {
                    #[serde(borrow)]
                    $field: Option<Cow<'a, str>>,
                }
            };
        }
        one_field!(Body, body);
        one_field!(BodyText, text);
        one_field!(Name, name);
        one_field!(Emoji, emoji);
        one_field!(Caption, caption);
        #[derive(Default, serde::Deserialize)]
        struct Interactive<'a> {
            #[serde(borrow)]
            body: Option<BodyText<'a>>,
        }
        let o = &self.object;
        let s = match self.kind {
            MessageType::Text => o.read::<Body>().body,
            MessageType::Interactive => o.read::<Interactive>().body.and_then(|b| b.text),
            MessageType::Template => o.read::<Name>().name,
            MessageType::Reaction => o.read::<Emoji>().emoji,
            _ => o.read::<Caption>().caption,
        };
        s.map(Cow::into_owned)
    }

    /// A template's name and language code (empty if not given).
    pub fn template_key(&self) -> (String, String) {
        #[derive(Default, serde::Deserialize)]
        struct Language {
            code: Option<String>,
        }
        #[derive(Default, serde::Deserialize)]
        struct Key {
            name: Option<String>,
            language: Option<Language>,
        }
        let k: Key = self.object.read();
        (
            k.name.unwrap_or_default(),
            k.language.and_then(|l| l.code).unwrap_or_default(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn content(kind: MessageType, object: Value) -> Content {
        Content {
            kind,
            object: object.into(),
            context_id: None,
        }
    }

    #[test]
    fn summaries_read_one_field_of_the_text() {
        use serde_json::json;
        let cases = [
            (
                MessageType::Text,
                json!({ "body": "say \"hi\" ☺\n", "preview_url": true }),
                Some("say \"hi\" ☺\n"),
            ),
            (
                MessageType::Interactive,
                json!({ "type": "button", "body": { "text": "Pick" }, "action": { "buttons": [] } }),
                Some("Pick"),
            ),
            (
                MessageType::Template,
                json!({ "name": "hello", "language": { "code": "en" } }),
                Some("hello"),
            ),
            (
                MessageType::Reaction,
                json!({ "message_id": "w", "emoji": "👍" }),
                Some("👍"),
            ),
            (
                MessageType::Image,
                json!({ "link": "https://x/y.png", "caption": "a cat" }),
                Some("a cat"),
            ),
            (
                MessageType::Location,
                json!({ "latitude": 1.0, "longitude": 2.0 }),
                None,
            ),
            (MessageType::Text, json!({ "body": 7 }), None),
        ];
        for (kind, object, want) in cases {
            assert_eq!(content(kind, object).summary().as_deref(), want, "{kind}");
        }
    }

    #[test]
    fn a_template_key_is_its_name_and_language_code() {
        use serde_json::json;
        let t = content(
            MessageType::Template,
            json!({ "name": "order_update", "language": { "code": "pt_BR" }, "components": [] }),
        );
        assert_eq!(t.template_key(), ("order_update".into(), "pt_BR".into()));
        let bare = content(MessageType::Template, json!({ "name": "x" }));
        assert_eq!(bare.template_key(), ("x".into(), String::new()));
    }

    #[test]
    fn an_object_is_written_as_its_json_and_read_back_from_text_or_a_tree() {
        use serde_json::json;
        let c = content(MessageType::Text, json!({ "body": "a \"quoted\" word" }));
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(
            text,
            r#"{"kind":"text","object":{"body":"a \"quoted\" word"},"context_id":null}"#
        );
        assert_eq!(serde_json::from_str::<Content>(&text).unwrap(), c);
        let tree = serde_json::to_value(&c).unwrap();
        assert_eq!(tree["object"]["body"], "a \"quoted\" word");
        assert_eq!(serde_json::from_value::<Content>(tree).unwrap(), c);
        assert_eq!(c.object.to_value(), json!({ "body": "a \"quoted\" word" }));
    }

    #[test]
    fn meta_objects_are_kept_as_sent_and_compared_as_json() {
        let raw = |t: &str| serde_json::value::RawValue::from_string(t.into()).unwrap();
        let sent = Object::from_raw(raw(r#"{"type":"regular","billable":true}"#)).unwrap();
        assert_eq!(sent.json(), r#"{"type":"regular","billable":true}"#);
        for not_object in ["\"regular\"", "[1]", "null", "7"] {
            assert!(Object::from_raw(raw(not_object)).is_none(), "{not_object}");
        }
        // The same object with its keys in another order is the same.
        let reordered = Object::from_raw(raw(r#"{"billable":true,"type":"regular"}"#)).unwrap();
        assert_eq!(sent, reordered);
        let other = Object::from_raw(raw(r#"{"billable":false,"type":"regular"}"#)).unwrap();
        assert_ne!(sent, other);
    }

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
