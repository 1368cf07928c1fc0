//! Who a contact is: a phone number (`wa_id`), a business-scoped user id
//! (BSUID, `user_id`, e.g. `US.13491208655302741918`), or both
//! (CLOUD_API.md §3: since 2026 a contact with a WhatsApp username may hide
//! their phone number).
//!
//! A conversation is kept under the phone number when one is known, else
//! under the BSUID. When a notification names both, the BSUID is linked to
//! the phone number: later messages, statuses and API calls by either id
//! reach the one conversation, and a conversation kept under the BSUID
//! until then is merged into the phone number's.

use super::ops::StateOp;
use super::table::Node;
use super::{Account, State};
use crate::domain::Millis;
use crate::inbound::InboundMessage;

/// Whether `id` is a BSUID: a two-letter country code, a dot and up to 128
/// letters, digits (and, for parent ids, `ENT.`) — never a phone number.
pub fn is_bsuid(id: &str) -> bool {
    let b = id.as_bytes();
    b.len() >= 4
        && b.len() <= 140
        && b[0].is_ascii_uppercase()
        && b[1].is_ascii_uppercase()
        && b[2] == b'.'
        && b[3..]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'.')
}

impl State {
    /// The id a conversation with `contact` is kept under: the phone
    /// number a BSUID was linked to, or `contact` itself.
    pub fn resolve_contact(&self, account: u16, contact: &str) -> String {
        if is_bsuid(contact)
            && let Some(phone) = self.aliases.get(&(account, contact.into()))
        {
            return phone.to_string();
        }
        contact.to_string()
    }

    /// Before an inbound message is applied: link its BSUID to its phone
    /// number when it has both, or move it to the phone number's
    /// conversation when only the BSUID came and it was linked before.
    pub fn identify(&self, account: &Account, msg: &mut InboundMessage, now: Millis) {
        let Some(user_id) = msg.user_id.clone() else {
            return;
        };
        if msg.from.as_str() == user_id {
            let phone = self.resolve_contact(account.id, &user_id);
            if phone != user_id {
                msg.from = phone.into();
            }
        } else if !is_bsuid(&msg.from) {
            self.link(account, &user_id, &msg.from, now);
        }
    }

    /// BSUID `user_id` is the contact with phone number `wa_id`.
    pub fn link(&self, account: &Account, user_id: &str, wa_id: &str, now: Millis) {
        let key = (account.id, Box::<str>::from(user_id));
        if self.aliases.get(&key).is_some_and(|p| &**p == wa_id) {
            return;
        }
        self.aliases.insert(key, wa_id.into());
        self.log(|| StateOp::Link {
            account: account.name().to_string(),
            user_id: user_id.to_string(),
            wa_id: wa_id.to_string(),
        });
        self.merge(account.id, user_id, wa_id, now);
    }

    /// Fold the conversation kept under `user_id` (if any) into `wa_id`'s.
    /// Replayed as part of [`StateOp::Link`], so it changes nothing else.
    pub(super) fn merge(&self, account: u16, user_id: &str, wa_id: &str, now: Millis) {
        let old = self
            .conversations
            .with(account, user_id, |n| n.to_conversation(true));
        self.conversations.upsert(account, wa_id, |n| {
            if let Some(old) = old {
                merge_into(n, old);
            }
            set_ids(n, Some(user_id), None);
            if n.last_activity == 0 {
                n.last_activity = now;
            }
        });
        // What stays under the BSUID: its history not yet archived (the
        // archive's hook trims it; `recent` reads it with the phone
        // number's), then nothing, and it goes.
        let husk = self.conversations.with_mut(account, user_id, |n| {
            n.set_fields(super::Conversation::default());
            n.set_window(None);
            n.recent_len() > 0
        });
        if husk == Some(false) {
            self.conversations.remove(account, user_id);
        }
    }

    /// Keep the contact's BSUID and username on their conversation `n`
    /// (under its lock, as [`State::inbound`] applies the message); logged
    /// only when they change.
    pub(super) fn note_contact_ids(&self, account: &Account, msg: &InboundMessage, n: &mut Node) {
        if msg.user_id.is_none() && msg.username.is_none() {
            return;
        }
        let user_id = n.user_id();
        let username = n.extra().and_then(|e| e.username.as_deref());
        let fresh_id = msg.user_id.as_deref().filter(|u| Some(*u) != user_id);
        let fresh_name = msg.username.as_deref().filter(|u| Some(*u) != username);
        if fresh_id.is_none() && fresh_name.is_none() {
            return;
        }
        set_ids(n, msg.user_id.as_deref(), msg.username.as_deref());
        let e = n.extra();
        self.log(|| StateOp::ContactIds {
            account: account.name().to_string(),
            contact: msg.from.to_string(),
            user_id: n.user_id().map(str::to_string),
            username: e.and_then(|e| e.username.as_deref().map(str::to_string)),
        });
    }

    /// Links to conversations that were forgotten go with them.
    pub(super) fn unlink_forgotten(&self, gone: &std::collections::HashSet<(u16, &str)>) {
        if !self.aliases.is_empty() {
            self.aliases
                .retain(|(account, _), phone| !gone.contains(&(*account, &**phone)));
        }
    }

    /// Every link, for a snapshot.
    pub(super) fn links(&self) -> Vec<(u16, String, String)> {
        self.aliases
            .iter()
            .map(|e| (e.key().0, e.key().1.to_string(), e.value().to_string()))
            .collect()
    }
}

/// Set the ids that are given (a missing one is kept).
pub(super) fn set_ids(n: &mut Node, user_id: Option<&str>, username: Option<&str>) {
    if let Some(u) = user_id {
        n.set_user_id(Some(u));
    }
    if let Some(u) = username {
        n.extra_mut().username = Some(u.into());
    }
}

/// The merged conversation: the window that ends last, the consent decided
/// last, the rule state, vars and handoff of the one active last, the name
/// and ids that are known. History stays where it was archived, under the
/// BSUID, and is read from there with the phone number's
/// ([`State::recent`]).
fn merge_into(n: &mut Node, old: super::Conversation) {
    let window = match (n.window(), old.window) {
        (Some(a), Some(b)) => Some(if b.expires > a.expires { b } else { a }),
        (a, b) => a.or(b),
    };
    let mut merged = n.to_conversation(false);
    if old.last_activity > merged.last_activity {
        merged.state = old.state;
        merged.vars = old.vars;
        merged.handoff_until = old.handoff_until;
        merged.last_activity = old.last_activity;
    }
    if old.consent_at > merged.consent_at {
        merged.opted_out = old.opted_out;
        merged.consent_at = old.consent_at;
    }
    merged.marketing_opt_out |= old.marketing_opt_out;
    merged.name = merged.name.or(old.name);
    merged.username = merged.username.or(old.username);
    n.set_fields(merged);
    n.set_window(window);
}

#[cfg(test)]
mod tests {
    use super::*;

    const BSUID: &str = "US.13491208655302741918";
    const PHONE: &str = "16315551183";

    fn from(wamid: &str, phone: Option<&str>, at: Millis) -> InboundMessage {
        InboundMessage {
            user_id: Some(BSUID.into()),
            username: Some("carol.b".into()),
            ..InboundMessage::test_text(wamid, phone.unwrap_or(BSUID), "hi", at)
        }
    }

    fn arrive(s: &State, a: &Account, mut msg: InboundMessage, now: Millis) -> String {
        s.identify(a, &mut msg, now);
        s.inbound(a, &msg, now);
        msg.from.to_string()
    }

    #[test]
    fn a_link_merges_the_bsuid_conversation_and_survives_a_snapshot() {
        let s = State::for_test();
        let a = s.account_by_name("main").unwrap();
        assert_eq!(arrive(&s, &a, from("w1", None, 1000), 1000), BSUID);
        s.set_state(a.id, BSUID, "menu".into(), 1000);
        s.set_opted_out(a.id, BSUID, true, 1000, 1000);
        assert_eq!(arrive(&s, &a, from("w2", Some(PHONE), 2000), 2000), PHONE);
        let c = s.conversation(&a, PHONE).unwrap().conversation;
        assert_eq!(c.state, "menu");
        assert!(c.opted_out, "consent moves with the conversation");
        assert_eq!(c.user_id.as_deref(), Some(BSUID));
        assert_eq!(c.username.as_deref(), Some("carol.b"));
        assert_eq!(s.resolve_contact(a.id, BSUID), PHONE);
        assert_eq!(arrive(&s, &a, from("w3", None, 3000), 3000), PHONE);
        assert_eq!(s.conversations(None).len(), 1, "one conversation listed");
        // A fresh state from the snapshot knows the link and the ids.
        let restored = State::for_test();
        for record in s.dump_ops() {
            let (_, json) = crate::persist::decode(&record).unwrap();
            restored.restore(json, false).unwrap();
        }
        assert_eq!(restored.resolve_contact(a.id, BSUID), PHONE);
        let c = restored.conversation(&a, PHONE).unwrap().conversation;
        assert_eq!(
            (c.state.as_str(), c.user_id.as_deref()),
            ("menu", Some(BSUID))
        );
    }

    #[test]
    fn a_pruned_conversation_takes_its_link_along() {
        let s = State::for_test();
        let a = s.account_by_name("main").unwrap();
        arrive(&s, &a, from("w1", Some(PHONE), 1000), 1000);
        assert_eq!(s.resolve_contact(a.id, BSUID), PHONE);
        let day = 86_400_000;
        assert_eq!(
            s.prune(60 * day, std::time::Duration::from_secs(30 * 86_400)),
            1
        );
        assert_eq!(s.resolve_contact(a.id, BSUID), BSUID);
    }

    #[test]
    fn bsuids_are_told_from_phone_numbers() {
        assert!(is_bsuid("US.13491208655302741918"));
        assert!(is_bsuid("BR.ENT.99aa"));
        assert!(!is_bsuid("16315551181"));
        assert!(!is_bsuid("us.123"));
        assert!(!is_bsuid("US."));
        assert!(!is_bsuid("US.12 3"));
    }
}
