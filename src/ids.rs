//! Typed ids. Each is a string on the wire and on disk (serde
//! transparent) but a type of its own in the code, so a wamid cannot be
//! passed where a router message id is meant, and an id's kind is known
//! from its type, not from its prefix.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;

use crate::domain::Millis;

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            pub fn as_str(&self) -> &str {
                &self.0
            }

            pub fn into_string(self) -> String {
                self.0
            }
        }

        impl Deref for $name {
            type Target = str;
            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                $name(s)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                $name(s.to_string())
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }

        impl PartialEq<String> for $name {
            fn eq(&self, other: &String) -> bool {
                &self.0 == other
            }
        }
    };
}

string_id!(
    /// Meta's id of a WhatsApp message (`wamid.…`), inbound or outbound.
    Wamid
);

string_id!(
    /// A contact of a business number: the `wa_id` (phone number digits),
    /// or Meta's business-scoped user id when no number is known.
    ContactId
);

string_id!(
    /// The name of a configured (or sandbox) account.
    AccountName
);

string_id!(
    /// The router's id of an outbound message (`msg_` + a UUIDv7).
    MessageId
);

impl MessageId {
    const PREFIX: &'static str = "msg_";

    /// A new id, sorting by creation time.
    pub fn generate() -> Self {
        MessageId(format!("{}{}", Self::PREFIX, uuid::Uuid::now_v7().simple()))
    }

    /// An id derived from `key`: the same key always gives the same id, and
    /// its time part is `ms`, so it still sorts by time. Rule replies use
    /// it, so that running the rules of one message again (after a crash)
    /// cannot create a second reply.
    pub fn derived(ms: Millis, key: &str) -> Self {
        MessageId(crate::domain::derived_id("msg", ms, key))
    }

    /// The smallest id of a message created at `ms` or later: ids of
    /// older messages sort below it.
    pub fn time_floor(ms: Millis) -> String {
        format!("{}{:012x}", Self::PREFIX, ms.max(0))
    }

    /// The creation time (unix ms) in the id, if it has one.
    pub fn time_ms(&self) -> Option<Millis> {
        let hex = self.0.strip_prefix(Self::PREFIX)?.get(..12)?;
        Millis::from_str_radix(hex, 16).ok()
    }

    /// `s` if it has the form of a router message id (an API caller may
    /// name a message by it or by its wamid).
    pub fn parse(s: &str) -> Option<Self> {
        s.strip_prefix(Self::PREFIX)
            .is_some_and(|rest| !rest.is_empty())
            .then(|| MessageId(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_ids_are_told_from_wamids_by_parse_only() {
        let id = MessageId::generate();
        assert_eq!(MessageId::parse(&id), Some(id.clone()));
        assert_eq!(MessageId::parse("wamid.HBgL"), None);
        assert_eq!(MessageId::parse("msg_"), None);
        assert_eq!(MessageId::derived(5, "k"), MessageId::derived(5, "k"));
        assert_ne!(MessageId::derived(5, "k"), MessageId::derived(5, "l"));
        assert_eq!(
            MessageId::derived(1_700_000_000_123, "k").time_ms(),
            Some(1_700_000_000_123)
        );
        assert_eq!(MessageId::time_floor(77), "msg_00000000004d");
    }

    #[test]
    fn ids_are_plain_strings_on_the_wire() {
        let w = Wamid::from("wamid.1");
        assert_eq!(serde_json::to_string(&w).unwrap(), "\"wamid.1\"");
        let back: Wamid = serde_json::from_str("\"wamid.1\"").unwrap();
        assert_eq!(back, "wamid.1");
    }
}
