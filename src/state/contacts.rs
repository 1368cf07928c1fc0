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

use std::hash::BuildHasher;

use dashmap::DashMap;
use parking_lot::RwLock;

use super::linkset::LinkSet;
use super::ops::StateOp;
use super::table::Node;
use super::{Account, State};
use crate::domain::Millis;
use crate::inbound::InboundMessage;

/// Shards of the links (independent locks), picked by a key's top bits.
const LINK_SHARD_BITS: u32 = 4;
const LINK_SHARDS: usize = 1 << LINK_SHARD_BITS;

/// One shard of the links: (key, node position) entries.
type LinkShard = RwLock<LinkSet>;

/// The links BSUID → the conversation it belongs to, per account.
///
/// Most contacts come with both ids, so there is a link per contact: it is
/// kept as 8 bytes, a keyed 32-bit hash of (account, BSUID) and the
/// position of the conversation's node in its table, in a sorted vector
/// ([`LinkSet`]; two boxed strings in a map entry cost ~110 bytes a
/// contact, as much as the rest of an open window; a 64-bit hash → the
/// phone number, 16; the pairs in a hash table, 18). An entry only names a
/// candidate: a link counts when the node at that position is of the
/// account and carries that BSUID, checked on every lookup, so BSUIDs
/// sharing a hash never reach each other's conversation and an entry left
/// behind by a node that changed or went answers nothing. A BSUID linked
/// to a phone whose conversation later names another BSUID no longer
/// resolves there (Meta gives a contact a new BSUID only with a new phone
/// number).
pub(super) struct Links {
    shards: Box<[LinkShard]>,
    /// Links to a node past the positions a table can name (2^26 nodes
    /// in one shard: not reached in practice), kept whole.
    exact: DashMap<(u16, Box<str>), Box<str>>,
    keys: std::hash::RandomState,
    /// Tests: every BSUID gets one hash.
    #[cfg(test)]
    collide: std::sync::atomic::AtomicBool,
}

impl Default for Links {
    fn default() -> Self {
        Links {
            shards: (0..LINK_SHARDS)
                .map(|_| RwLock::new(LinkSet::with_fixed_bits(LINK_SHARD_BITS)))
                .collect(),
            exact: DashMap::new(),
            keys: Default::default(),
            #[cfg(test)]
            collide: Default::default(),
        }
    }
}

impl Links {
    fn key(&self, account: u16, user_id: &str) -> u32 {
        #[cfg(test)]
        if self.collide.load(std::sync::atomic::Ordering::Relaxed) {
            return 42;
        }
        (self.keys.hash_one((account, user_id)) >> 32) as u32
    }

    fn shard(&self, key: u32) -> &LinkShard {
        &self.shards[(key >> (32 - LINK_SHARD_BITS)) as usize]
    }

    /// The link (key, position), if kept.
    fn has(&self, key: u32, position: u32) -> bool {
        self.shard(key).read().contains(key, position)
    }

    /// Drop the link (key, position), if kept.
    fn drop_entry(&self, key: u32, position: u32) {
        self.shard(key).write().remove(key, position);
    }
}

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
            && let Some(phone) = self.linked_phone(account, contact)
        {
            return phone;
        }
        contact.to_string()
    }

    /// The contact id (phone number) BSUID `user_id` is linked to.
    pub(super) fn linked_phone(&self, account: u16, user_id: &str) -> Option<String> {
        let links = &self.aliases;
        if !links.exact.is_empty()
            && let Some(phone) = links.exact.get(&(account, user_id.into()))
        {
            return Some(phone.to_string());
        }
        let key = links.key(account, user_id);
        // Lock order: a link shard, then a conversation shard (never the
        // other way round).
        let shard = links.shard(key).read();
        shard.positions(key).find_map(|position| {
            self.conversations
                .at(position, |n| {
                    (n.account == account && n.has_user_id(user_id)).then(|| n.contact())
                })
                .flatten()
        })
    }

    /// Whether `user_id` is linked to `wa_id` already.
    fn is_linked(&self, account: u16, user_id: &str, wa_id: &str) -> bool {
        let links = &self.aliases;
        match self.conversations.position(account, wa_id) {
            Some(p) if links.exact.is_empty() => links.has(links.key(account, user_id), p),
            _ => self.linked_phone(account, user_id).as_deref() == Some(wa_id),
        }
    }

    /// Keep the link `user_id` → `wa_id`, whose conversation exists and
    /// carries `user_id` (live and on replay, after [`State::merge`]).
    pub(super) fn put_link(&self, account: u16, user_id: &str, wa_id: &str) {
        let links = &self.aliases;
        let exact_key = (account, Box::<str>::from(user_id));
        let Some(position) = self.conversations.position(account, wa_id) else {
            links.exact.insert(exact_key, wa_id.into());
            return;
        };
        let key = links.key(account, user_id);
        let names_it = |p: u32| {
            self.conversations
                .at(p, |n| n.account == account && n.has_user_id(user_id))
                .unwrap_or(false)
        };
        let mut shard = links.shard(key).write();
        // The BSUID moved to another number: the old link goes (its
        // conversation may still carry the BSUID).
        let moved: Vec<u32> = shard
            .positions(key)
            .filter(|&p| p != position && names_it(p))
            .collect();
        for p in moved {
            shard.remove(key, p);
        }
        shard.insert(key, position);
        drop(shard);
        if !links.exact.is_empty() {
            links.exact.remove(&exact_key);
        }
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
        if self.is_linked(account.id, user_id, wa_id) {
            return;
        }
        self.log(|| StateOp::Link {
            account: account.name().to_string(),
            user_id: user_id.to_string(),
            wa_id: wa_id.to_string(),
        });
        self.merge(account.id, user_id, wa_id, now);
        self.put_link(account.id, user_id, wa_id);
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
        let username = n.extra().and_then(|e| e.username.as_deref());
        let fresh_id = msg.user_id.as_deref().filter(|u| !n.has_user_id(u));
        let fresh_name = msg.username.as_deref().filter(|u| Some(*u) != username);
        if fresh_id.is_none() && fresh_name.is_none() {
            return;
        }
        set_ids(n, msg.user_id.as_deref(), msg.username.as_deref());
        let e = n.extra();
        self.log(|| StateOp::ContactIds {
            account: account.name().to_string(),
            contact: msg.from.to_string(),
            user_id: n.user_id().map(Into::into),
            username: e.and_then(|e| e.username.as_deref().map(str::to_string)),
        });
    }

    /// Forget a conversation and the link to it.
    pub(super) fn forget_conversation(&self, account: u16, contact: &str) {
        let removed = self.conversations.take(account, contact);
        let links = &self.aliases;
        if let Some((position, node)) = removed
            && let Some(u) = node.user_id()
        {
            links.drop_entry(links.key(account, &u), position);
        }
        if !links.exact.is_empty() {
            links
                .exact
                .retain(|(a, _), phone| !(*a == account && &**phone == contact));
        }
    }

    /// Every link, for a snapshot: each conversation's BSUID that resolves
    /// to it, and the exact ones.
    pub(super) fn links(&self) -> Vec<(u16, String, String)> {
        let mut all = Vec::new();
        // Collected first: no link shard is locked under a conversation's.
        self.conversations.for_each(|n| {
            if let Some(u) = n.user_id() {
                all.push((n.account, String::from(u), n.contact()));
            }
        });
        all.retain(|(a, u, contact)| {
            u != contact && self.linked_phone(*a, u).as_ref() == Some(contact)
        });
        all.extend(
            self.aliases
                .exact
                .iter()
                .map(|e| (e.key().0, e.key().1.to_string(), e.value().to_string())),
        );
        all
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

    /// Two BSUIDs with one hash (forced: every BSUID hashes alike here)
    /// both reach their own conversation, across a snapshot.
    #[test]
    fn bsuids_sharing_a_hash_keep_apart() {
        let s = State::for_test();
        s.aliases
            .collide
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let a = s.account_by_name("main").unwrap();
        let (other, other_phone) = ("US.99", "4915112345678");
        arrive(&s, &a, from("w1", Some(PHONE), 1000), 1000);
        let msg = InboundMessage {
            user_id: Some(other.into()),
            ..InboundMessage::test_text("w2", other_phone, "hi", 2000)
        };
        arrive(&s, &a, msg, 2000);
        assert_eq!(s.resolve_contact(a.id, BSUID), PHONE);
        assert_eq!(s.resolve_contact(a.id, other), other_phone);
        assert!(s.aliases.exact.is_empty());
        let held: usize = s.aliases.shards.iter().map(|t| t.read().len()).sum();
        assert_eq!(held, 2, "two entries, one hash");
        let mut links = s.links();
        links.sort();
        let expected = [
            (a.id, BSUID.to_string(), PHONE.to_string()),
            (a.id, other.to_string(), other_phone.to_string()),
        ];
        assert_eq!(links, expected);
        // Forgetting one conversation takes its link only.
        s.forget_conversation(a.id, other_phone);
        assert_eq!(s.resolve_contact(a.id, other), other);
        assert_eq!(s.resolve_contact(a.id, BSUID), PHONE);
    }

    #[test]
    fn a_bsuid_that_moves_to_another_number_follows_it() {
        let s = State::for_test();
        let a = s.account_by_name("main").unwrap();
        let new_phone = "4915112345678";
        arrive(&s, &a, from("w1", Some(PHONE), 1000), 1000);
        arrive(&s, &a, from("w2", Some(new_phone), 2000), 2000);
        assert_eq!(s.resolve_contact(a.id, BSUID), new_phone);
        let held: usize = s.aliases.shards.iter().map(|t| t.read().len()).sum();
        assert_eq!(held, 1, "the old link went");
        let links = s.links();
        assert_eq!(links, [(a.id, BSUID.to_string(), new_phone.to_string())]);
    }

    #[test]
    fn a_link_counts_while_the_phone_names_the_bsuid() {
        let s = State::for_test();
        let a = s.account_by_name("main").unwrap();
        arrive(&s, &a, from("w1", Some(PHONE), 1000), 1000);
        assert_eq!(s.resolve_contact(a.id, BSUID), PHONE);
        s.conversations
            .with_mut(a.id, PHONE, |n| n.set_user_id(Some("US.7")));
        assert_eq!(s.resolve_contact(a.id, BSUID), BSUID);
        // A text contact id is linked whole.
        s.link(&a, "US.8", "wa-text-id", 2000);
        assert_eq!(s.resolve_contact(a.id, "US.8"), "wa-text-id");
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
