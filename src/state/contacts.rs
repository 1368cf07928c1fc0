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
use crate::inbound::{IdentityChange, InboundMessage};

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

    /// Before a `system` message is applied: when it announces the
    /// contact's new phone number or BSUID, their conversation follows
    /// ([`State::renumber`], or a link of the new BSUID to the number),
    /// and the message is filed under the new id.
    pub fn follow_identity(&self, account: &Account, msg: &mut InboundMessage, now: Millis) {
        let Some(change) = msg.identity_change() else {
            return;
        };
        let current = self.resolve_contact(account.id, &msg.from);
        match change {
            IdentityChange::Number { wa_id, user_id } => {
                let wa_id: String = wa_id.chars().filter(char::is_ascii_digit).collect();
                if wa_id.is_empty() || wa_id == current {
                    return;
                }
                self.renumber(account, &current, &wa_id, now);
                msg.from = wa_id.into();
                // The new BSUID is linked to the new number as the
                // message is identified.
                msg.user_id = user_id.filter(|u| is_bsuid(u));
            }
            IdentityChange::UserId(user_id) if is_bsuid(&user_id) => {
                if is_bsuid(&current) {
                    // Known by BSUID only: the conversation moves over.
                    self.renumber(account, &current, &user_id, now);
                    msg.from = user_id.clone().into();
                } else {
                    // Linked to the number as the message is identified.
                    msg.from = current.into();
                }
                msg.user_id = Some(user_id);
            }
            IdentityChange::UserId(_) => {}
        }
    }

    /// Meta's `user_id_update`: the contact's BSUID `previous` is now
    /// `current` (`wa_id`: their phone number, when Meta gives it). A
    /// contact the router never talked to is left alone.
    pub fn new_user_id(
        &self,
        account: &Account,
        wa_id: Option<&str>,
        previous: &str,
        current: &str,
        now: Millis,
    ) {
        if !is_bsuid(current) || previous == current {
            return;
        }
        let linked = self.linked_phone(account.id, previous);
        let phone = wa_id
            .filter(|w| !w.is_empty() && !is_bsuid(w))
            .map(str::to_string)
            .or_else(|| linked.clone());
        let Some(phone) = phone else {
            // Known by BSUID only: the conversation moves to the new one.
            self.renumber(account, previous, current, now);
            return;
        };
        // A conversation kept under the old BSUID, never linked: it was
        // this number's, so it merges first.
        if linked.is_none() && self.conversations.position(account.id, previous).is_some() {
            self.link(account, previous, &phone, now);
        }
        if self.conversations.position(account.id, &phone).is_some() {
            self.link(account, current, &phone, now);
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
        self.fold(account, old, wa_id, Some(user_id), now);
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

    /// `old` (a conversation kept under another id) into `to`'s, created
    /// if need be, which takes BSUID `user_id` when one is given.
    fn fold(
        &self,
        account: u16,
        old: Option<super::Conversation>,
        to: &str,
        user_id: Option<&str>,
        now: Millis,
    ) {
        self.conversations.upsert(account, to, |n| {
            if let Some(old) = old {
                merge_into(n, old);
            }
            set_ids(n, user_id, None);
            if n.last_activity == 0 {
                n.last_activity = now;
            }
        });
    }

    /// The contact kept under `from` is now `to`: Meta's `system`
    /// `user_changed_number` (a new phone number), or a new BSUID of a
    /// contact known by BSUID only (`user_changed_user_id`,
    /// `user_id_update`). Their conversation moves over as a link merges
    /// ([`merge_into`]: window, consent, state, vars, handoff), if there
    /// is one. What stays under `from` is an empty
    /// conversation that keeps its history (listed under `from`) and its
    /// history's numbering, so a number given to someone else later
    /// continues it rather than overwriting it; retention prunes it.
    pub fn renumber(&self, account: &Account, from: &str, to: &str, now: Millis) {
        if from == to || self.conversations.position(account.id, from).is_none() {
            return;
        }
        self.log(|| StateOp::Renumber {
            account: account.name().to_string(),
            from: from.to_string(),
            to: to.to_string(),
        });
        self.move_conversation(account.id, from, to, now);
    }

    /// Replayed as [`StateOp::Renumber`].
    pub(super) fn move_conversation(&self, account: u16, from: &str, to: &str, now: Millis) {
        let Some(old) = self
            .conversations
            .with(account, from, |n| n.to_conversation(false))
        else {
            return;
        };
        let last_activity = old.last_activity;
        self.fold(account, Some(old), to, is_bsuid(to).then_some(to), now);
        self.conversations.with_mut(account, from, |n| {
            n.set_fields(super::Conversation {
                last_activity,
                ..super::Conversation::default()
            });
            n.set_window(None);
        });
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
        s.follow_identity(a, &mut msg, now);
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
        let restored = snapshot_of(&s);
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

    const NEW_PHONE: &str = "16315550147";
    const NEW_ID: &str = "US.77120394856601928374";

    /// Meta's `system` message from `from`, as the webhook parses it.
    fn system(wamid: &str, from: &str, system: serde_json::Value, at: Millis) -> InboundMessage {
        let raw = serde_json::json!({ "from": from, "id": wamid, "type": "system",
                                      "system": system });
        InboundMessage {
            kind: crate::inbound::InboundKind::Unsupported,
            raw_type: "system".into(),
            text: None,
            opens_window: false,
            raw: serde_json::value::RawValue::from_string(raw.to_string()).unwrap(),
            ..InboundMessage::test_text(wamid, from, "", at)
        }
    }

    fn snapshot_of(s: &State) -> State {
        let restored = State::for_test();
        for record in s.dump_ops() {
            let (_, json) = crate::persist::decode(&record).unwrap();
            restored.restore(json, false).unwrap();
        }
        restored
    }

    #[test]
    fn a_changed_number_takes_the_conversation_along() {
        let s = State::for_test();
        let a = s.account_by_name("main").unwrap();
        arrive(&s, &a, from("w1", Some(PHONE), 1000), 1000);
        s.set_state(a.id, PHONE, "menu".into(), 1000);
        s.set_opted_out(a.id, PHONE, true, 1000, 1000);
        let window = s.window(a.id, PHONE).expect("opened by w1");
        let change = serde_json::json!({ "type": "user_changed_number", "wa_id": NEW_PHONE,
                                         "user_id": NEW_ID, "body": "changed" });
        let filed = arrive(&s, &a, system("w2", PHONE, change, 2000), 2000);
        assert_eq!(
            filed, NEW_PHONE,
            "the message is filed under the new number"
        );
        for s in [&s, &snapshot_of(&s)] {
            let c = s.conversation(&a, NEW_PHONE).unwrap();
            assert_eq!(c.window, Some(window), "the window moved");
            let c = c.conversation;
            assert_eq!(c.state, "menu");
            assert!(c.opted_out, "consent moves with the person");
            assert_eq!(c.user_id.as_deref(), Some(NEW_ID));
            assert_eq!(s.resolve_contact(a.id, NEW_ID), NEW_PHONE);
            let old = s.conversation(&a, PHONE).expect("its history stays");
            assert_eq!(old.window, None);
            assert_eq!(old.conversation.state, "");
            assert!(!old.conversation.opted_out);
        }
        // Someone given the old number later starts afresh, and the old
        // history's numbering goes on.
        let before = s
            .conversations
            .with(a.id, PHONE, |n| n.recent_seq())
            .unwrap();
        assert!(before >= 1);
        arrive(
            &s,
            &a,
            InboundMessage::test_text("w3", PHONE, "hello", 3000),
            3000,
        );
        let after = s
            .conversations
            .with(a.id, PHONE, |n| n.recent_seq())
            .unwrap();
        assert_eq!(after, before + 1);
        assert!(!s.conversation(&a, PHONE).unwrap().conversation.opted_out);
    }

    #[test]
    fn a_new_bsuid_is_linked_or_takes_the_conversation_along() {
        let s = State::for_test();
        let a = s.account_by_name("main").unwrap();
        // A contact with a phone number: the new BSUID reaches it.
        arrive(&s, &a, from("w1", Some(PHONE), 1000), 1000);
        let change = serde_json::json!({ "type": "user_changed_user_id", "user_id": NEW_ID });
        assert_eq!(
            arrive(&s, &a, system("w2", PHONE, change, 2000), 2000),
            PHONE
        );
        assert_eq!(s.resolve_contact(a.id, NEW_ID), PHONE);
        assert_eq!(s.resolve_contact(a.id, BSUID), BSUID, "the old one no more");
        // A contact known by BSUID only: the conversation moves to the new
        // one (Meta's `user_id_update`).
        let (only, next) = ("GB.111", "GB.222");
        let msg = InboundMessage {
            user_id: Some(only.into()),
            ..InboundMessage::test_text("w3", only, "hi", 3000)
        };
        arrive(&s, &a, msg, 3000);
        s.set_state(a.id, only, "menu".into(), 3000);
        s.new_user_id(&a, None, only, next, 4000);
        for s in [&s, &snapshot_of(&s)] {
            let c = s.conversation(&a, next).unwrap().conversation;
            assert_eq!(
                (c.state.as_str(), c.user_id.as_deref()),
                ("menu", Some(next))
            );
            assert!(s.window(a.id, next).is_some());
        }
        // With the phone number given, the new BSUID is linked to it.
        s.new_user_id(&a, Some(PHONE), NEW_ID, "US.5", 5000);
        assert_eq!(s.resolve_contact(a.id, "US.5"), PHONE);
        // A contact the router never talked to is left alone.
        let count = s.conversations(None).len();
        s.new_user_id(&a, None, "US.6", "US.7", 6000);
        s.new_user_id(&a, Some("4900"), "US.6", "US.7", 6000);
        assert_eq!(s.conversations(None).len(), count);
    }
}
