//! The record format of the journal's payloads (the journal itself only
//! frames bytes, [`crate::journal`]).
//!
//! Format 1 (written now): `[1][owner][JSON]`, where the owner byte says
//! which store the record belongs to (`s` conversation state, `o` outbound
//! records, `e` event deliveries) and the JSON is that store's op type:
//! [`crate::state::ops::StateOp`], [`crate::outbound::ops::OutboxOp`],
//! [`crate::events::ops::EventOp`]. Those are wire types of their own, not
//! the in-memory structs, so renaming a field in memory cannot change what
//! is on disk.
//!
//! Format 0 (before versions): a bare JSON object `{"Variant": {...}}` of
//! one op enum shared by all stores. Its variants kept their names and
//! shapes in format 1, so a format-0 record is read by the store that owns
//! its variant; `tests/fixtures/journal-v0/` holds a data_dir written by
//! format 0 and a test starts a router on it.

use serde::Serialize;

/// The format this router writes.
pub const FORMAT: u8 = 1;

/// The store a record belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    State,
    Outbox,
    Events,
}

impl Owner {
    fn tag(self) -> u8 {
        match self {
            Owner::State => b's',
            Owner::Outbox => b'o',
            Owner::Events => b'e',
        }
    }

    fn from_tag(tag: u8) -> Option<Self> {
        [Owner::State, Owner::Outbox, Owner::Events]
            .into_iter()
            .find(|o| o.tag() == tag)
    }
}

/// Encode one op of `owner` in the current format.
pub fn encode<T: Serialize>(owner: Owner, op: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    out.push(FORMAT);
    out.push(owner.tag());
    // The op types hold strings, numbers and JSON values only.
    serde_json::to_writer(&mut out, op).expect("journal ops serialize");
    out
}

/// Which store a payload belongs to, and its JSON.
pub fn decode(payload: &[u8]) -> Result<(Owner, &[u8]), String> {
    match payload {
        [b'{', ..] => v0_owner(payload).map(|o| (o, payload)),
        [FORMAT, tag, json @ ..] => Owner::from_tag(*tag)
            .map(|o| (o, json))
            .ok_or_else(|| format!("unknown record owner {tag:#04x}")),
        [version, ..] => Err(format!(
            "record format {version} is not one this router reads (0 and {FORMAT}); \
             was the data_dir written by a newer wa-router?"
        )),
        [] => Err("empty record".into()),
    }
}

/// Format 0: the owner by the op's variant name (the first key).
fn v0_owner(payload: &[u8]) -> Result<Owner, String> {
    let name = payload
        .strip_prefix(b"{\"")
        .and_then(|rest| rest.split(|&b| b == b'"').next())
        .ok_or("not a format-0 record")?;
    Ok(match name {
        b"Record" | b"ForgetRecord" => Owner::Outbox,
        b"Event" | b"EventDone" => Owner::Events,
        b"Account" | b"Seen" | b"Window" | b"Conversation" | b"Idempotency" | b"Pending"
        | b"Done" | b"Forget" => Owner::State,
        other => {
            return Err(format!(
                "unknown format-0 record {:?}",
                String::from_utf8_lossy(other)
            ));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_records_carry_format_and_owner() {
        let bytes = encode(
            Owner::Outbox,
            &serde_json::json!({"ForgetRecord": {"id": "x"}}),
        );
        assert_eq!(&bytes[..2], &[FORMAT, b'o']);
        let (owner, json) = decode(&bytes).unwrap();
        assert_eq!(owner, Owner::Outbox);
        assert_eq!(json, br#"{"ForgetRecord":{"id":"x"}}"#);
    }

    #[test]
    fn format_zero_records_go_to_the_store_of_their_variant() {
        let cases: [(&[u8], Owner); 3] = [
            (br#"{"Seen":{"wamid":"w","at":1}}"#, Owner::State),
            (br#"{"Record":{}}"#, Owner::Outbox),
            (br#"{"EventDone":{}}"#, Owner::Events),
        ];
        for (bytes, owner) in cases {
            assert_eq!(decode(bytes).unwrap(), (owner, bytes));
        }
        assert!(decode(br#"{"Nope":{}}"#).is_err());
    }

    #[test]
    fn a_newer_format_is_refused_with_a_reason() {
        let err = decode(&[7, b's', b'{', b'}']).unwrap_err();
        assert!(err.contains("format 7"), "{err}");
        assert!(decode(&[]).is_err());
        assert!(decode(&[FORMAT, b'x', b'{']).is_err());
    }
}
