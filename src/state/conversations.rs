//! Conversations (SPEC §4): window, contact name, rule state and vars,
//! consent, handoff and the last messages both ways.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use super::ops::{ConversationWire, RecentWire, StateOp};
use super::{Account, State, Window};
use crate::archive::HistoryRow;
use crate::domain::Millis;
use crate::inbound::InboundMessage;

/// Messages kept per conversation (SPEC §4).
pub const RECENT: usize = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Direction {
    In,
    Out,
}

/// One entry of a conversation's recent messages.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Recent {
    pub direction: Direction,
    /// wamid for inbound, router message id for outbound.
    pub id: String,
    pub kind: String,
    pub text: Option<String>,
    pub at: Millis,
}

/// Everything but the window of one conversation.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Conversation {
    pub name: Option<String>,
    pub state: String,
    pub vars: BTreeMap<String, String>,
    pub handoff_until: Option<Millis>,
    pub opted_out: bool,
    /// When the last consent change was made (the keyword message's
    /// timestamp, or the API request's time): older keywords, which Meta
    /// may deliver late and out of order, do not undo it.
    #[serde(default)]
    pub consent_at: Option<Millis>,
    pub recent: VecDeque<Recent>,
    /// Entries ever added to `recent` (journal deltas are numbered by it).
    #[serde(default)]
    pub recent_seq: u64,
    pub last_activity: Millis,
    /// The 24 h window, kept in the conversation's entry (one key and one
    /// lookup for both; journaled as its own op).
    #[serde(skip)]
    pub window: Option<Window>,
    /// The contact's BSUID (Meta's business-scoped user id), when known.
    #[serde(default)]
    pub user_id: Option<String>,
    /// The contact's WhatsApp username, when they adopted one.
    #[serde(default)]
    pub username: Option<String>,
    /// Marketing messages stopped in the contact's WhatsApp settings
    /// (`user_preferences`): marketing templates are not sent.
    #[serde(default)]
    pub marketing_opt_out: bool,
}

/// The conversation as an inbound message left it, for the rules.
#[derive(Debug, Clone)]
pub struct InboundView {
    /// This message opened a window (none was open before it).
    pub new_conversation: bool,
    /// The conversation is handed off (an expired handoff just ended).
    pub handoff: bool,
}

/// The part of a conversation the routing step reads.
#[derive(Debug, Clone, Default)]
pub struct RoutingFacts {
    pub state: String,
    pub vars: BTreeMap<String, String>,
    pub handoff_until: Option<Millis>,
}

/// A conversation for the API.
#[derive(Debug, Clone)]
pub struct ConversationView {
    pub account: String,
    pub wa_id: String,
    pub window: Option<Window>,
    pub conversation: Conversation,
}

impl ConversationView {
    pub fn window_open(&self, now: Millis) -> bool {
        self.window.is_some_and(|w| w.expires > now)
    }
}

impl State {
    /// Apply an inbound message: window, contact name, recent messages.
    pub fn inbound(&self, account: &Account, msg: &InboundMessage, now: Millis) -> InboundView {
        self.conversations.upsert(account.id, &msg.from, |c| {
            let mut new_conversation = false;
            if msg.opens_window {
                // SPEC §4: from Meta's timestamp, clamped to now, only extended.
                let mut window = c.window();
                new_conversation = Window::extend(&mut window, msg.timestamp, now);
                c.set_window(window);
                if let Some(window) = window {
                    self.log(|| StateOp::Window {
                        account: account.name().to_string(),
                        contact: msg.from.to_string(),
                        window: window.into(),
                    });
                }
            }
            if let Some(name) = &msg.contact_name {
                c.set_name(Some(name));
            }
            self.note_contact_ids(account, msg, c);
            c.last_activity = now;
            let entry = Recent {
                direction: Direction::In,
                id: msg.wamid.to_string(),
                kind: msg.kind.as_str().to_string(),
                text: msg.text.clone(),
                at: msg.timestamp.min(now),
            };
            let seq = c.recent_seq() + 1;
            // A delta: the new entry, not the whole history again.
            self.log(|| StateOp::Recent {
                account: account.name().to_string(),
                contact: msg.from.to_string(),
                seq,
                entry: RecentWire::from(&entry),
                name: msg.contact_name.clone(),
                last_activity: now,
            });
            self.archive_recent(account.name(), &msg.from, seq, &entry);
            c.push_recent(entry);
            if c.handoff_until().is_some_and(|u| u <= now) {
                c.extra_mut().handoff_until = None;
                c.tidy();
            }
            // Routing reads state and vars when the message's turn comes
            // (`routing_facts`): not cloned here for every inbound message.
            InboundView {
                new_conversation,
                handoff: c.handoff_until().is_some(),
            }
        })
    }

    pub(super) fn update_conversation<R>(
        &self,
        account: u16,
        contact: &str,
        now: Millis,
        f: impl FnOnce(&mut Conversation) -> R,
    ) -> R {
        self.conversations.upsert(account, contact, |n| {
            n.last_activity = now;
            let mut c = n.to_conversation(false);
            let out = f(&mut c);
            // The fields only: the history is journaled entry by entry.
            self.log(|| StateOp::Conversation {
                account: self.account_name(account),
                contact: contact.to_string(),
                conversation: Box::new(ConversationWire::new(&c, false)),
            });
            n.set_fields(c);
            out
        })
    }

    pub fn set_state(&self, account: u16, contact: &str, state: String, now: Millis) {
        self.update_conversation(account, contact, now, |c| c.state = state);
    }

    pub fn set_vars(
        &self,
        account: u16,
        contact: &str,
        vars: impl IntoIterator<Item = (String, String)>,
        now: Millis,
    ) {
        self.update_conversation(account, contact, now, |c| {
            let mut merged = c.vars.clone();
            merged.extend(vars);
            let size = crate::domain::vars_bytes(&merged);
            if size > crate::domain::MAX_VARS_BYTES {
                tracing::error!(
                    size,
                    max = crate::domain::MAX_VARS_BYTES,
                    "a rule's vars would exceed the per-conversation limit; not set"
                );
            } else {
                c.vars = merged;
            }
        });
    }

    /// Record a consent change made at `at`; `false` (and nothing changed)
    /// when a later change is already recorded. Compared in whole seconds,
    /// the resolution of Meta's timestamps: within one second, the change
    /// processed last wins.
    pub fn set_opted_out(
        &self,
        account: u16,
        contact: &str,
        opted_out: bool,
        at: Millis,
        now: Millis,
    ) -> bool {
        self.update_conversation(account, contact, now, |c| {
            if c.consent_at.is_some_and(|last| last / 1000 > at / 1000) {
                return false;
            }
            c.opted_out = opted_out;
            c.consent_at = Some(at);
            true
        })
    }

    /// Hand the conversation to humans until `until`, or give it back (`None`).
    pub fn set_handoff(&self, account: u16, contact: &str, until: Option<Millis>, now: Millis) {
        self.update_conversation(account, contact, now, |c| c.handoff_until = until);
    }

    pub fn is_opted_out(&self, account: u16, contact: &str) -> bool {
        self.conversations
            .with(account, contact, |c| c.opted_out())
            .unwrap_or(false)
    }

    pub fn window(&self, account: u16, contact: &str) -> Option<Window> {
        self.conversations
            .with(account, contact, |c| c.window())
            .flatten()
    }

    pub fn window_open(&self, account: u16, contact: &str, now: Millis) -> bool {
        self.window(account, contact)
            .is_some_and(|w| w.is_open(now))
    }

    /// Meta said the window is closed (131047): believe it.
    pub fn close_window(&self, account: u16, contact: &str, now: Millis) {
        self.conversations.with_mut(account, contact, |c| {
            if let Some(mut window) = c.window() {
                window.close(now);
                c.set_window(Some(window));
                self.log(|| StateOp::Window {
                    account: self.account_name(account),
                    contact: contact.to_string(),
                    window: window.into(),
                });
            }
        });
    }

    pub fn open_windows(&self, now: Millis) -> usize {
        let mut open = 0;
        self.conversations.for_each(|c| {
            if c.window().is_some_and(|w| w.is_open(now)) {
                open += 1;
            }
        });
        open
    }

    /// What routing reads of a conversation (not its history): state,
    /// vars and handoff, or defaults for a conversation not known yet.
    pub fn routing_facts(&self, account: u16, contact: &str) -> RoutingFacts {
        self.conversations
            .with(account, contact, |c| {
                c.extra()
                    .map(|e| RoutingFacts {
                        state: e.state.clone(),
                        vars: e.vars.clone(),
                        handoff_until: e.handoff_until,
                    })
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    }

    pub fn conversation(&self, account: &Account, contact: &str) -> Option<ConversationView> {
        let conversation = self
            .conversations
            .with(account.id, contact, |c| c.to_conversation(true))?;
        Some(ConversationView {
            account: account.name().to_string(),
            wa_id: contact.to_string(),
            window: conversation.window,
            conversation,
        })
    }

    /// Add an outbound message to the conversation's recent messages.
    pub fn note_outbound(&self, account: u16, contact: &str, entry: Recent, now: Millis) {
        let account_name = self.account_name(account);
        self.conversations.upsert(account, contact, |c| {
            c.last_activity = now;
            let seq = c.recent_seq() + 1;
            self.log(|| StateOp::Recent {
                account: account_name.clone(),
                contact: contact.to_string(),
                seq,
                entry: RecentWire::from(&entry),
                name: None,
                last_activity: now,
            });
            self.archive_recent(&account_name, contact, seq, &entry);
            c.push_recent(entry);
        });
    }

    /// The last [`RECENT`] messages of a conversation, oldest first: the
    /// ones not yet archived from memory, the others from the archive.
    pub fn recent(&self, account: u16, contact: &str) -> Vec<Recent> {
        let (mut entries, user_id) = self.history_under(account, contact);
        // A BSUID linked later: the history kept under it before the link.
        if let Some(user_id) = user_id.filter(|u| u != contact) {
            entries.extend(self.history_under(account, &user_id).0);
            entries.sort_by_key(|e| e.at);
        }
        let skip = entries.len().saturating_sub(RECENT);
        entries.into_iter().skip(skip).collect()
    }

    /// The last [`RECENT`] entries kept under one contact id (memory and
    /// archive), oldest first, and the BSUID of that conversation.
    fn history_under(&self, account: u16, contact: &str) -> (Vec<Recent>, Option<String>) {
        // Memory first: an entry leaves it only after the archive has it.
        let (memory, last_seq, user_id) = self
            .conversations
            .with(account, contact, |c| {
                (
                    c.recent().cloned().collect::<Vec<_>>(),
                    c.recent_seq(),
                    c.user_id().map(Into::into),
                )
            })
            .unwrap_or_default();
        let first_in_memory = last_seq + 1 - memory.len() as u64;
        let mut all: BTreeMap<u64, Recent> = BTreeMap::new();
        if first_in_memory > 1 {
            for (seq, body) in self
                .archive
                .history(&self.account_name(account), contact, RECENT)
            {
                if seq < first_in_memory
                    && let Ok(w) = serde_json::from_slice::<RecentWire>(&body)
                {
                    all.insert(seq, w.into());
                }
            }
        }
        for (i, entry) in memory.into_iter().enumerate() {
            all.insert(first_in_memory + i as u64, entry);
        }
        let skip = all.len().saturating_sub(RECENT);
        (all.into_values().skip(skip).collect(), user_id)
    }

    /// Hand a history entry to the archive.
    pub(super) fn archive_recent(&self, account: &str, contact: &str, seq: u64, entry: &Recent) {
        let Ok(body) = serde_json::to_vec(&RecentWire::<&str>::from(entry)) else {
            return;
        };
        self.archive.put_history(HistoryRow {
            account: account.to_string(),
            contact: contact.to_string(),
            seq,
            at: entry.at,
            body,
        });
    }

    /// Every history entry in memory to the archive: after a replay (it
    /// may have them already; rows are replaced). The app runs it in the
    /// background once the router is ready.
    pub fn archive_all_recent(&self) {
        self.conversations.for_each(|c| {
            if c.recent_len() == 0 {
                return;
            }
            let account = self.account_name(c.account);
            let contact = c.contact();
            let first = c.recent_seq() + 1 - c.recent_len() as u64;
            for (i, entry) in c.recent().enumerate() {
                self.archive_recent(&account, &contact, first + i as u64, entry);
            }
        });
    }

    /// Drop history entries from memory once the archive committed them.
    /// Call once, on the shared state, before anything is stored.
    pub fn start_archiving(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        self.archive.on_history_committed(move |rows| {
            let Some(me) = me.upgrade() else {
                return;
            };
            for (account, contact, seq) in rows {
                let Some(a) = me.account_by_name(account) else {
                    continue;
                };
                me.conversations
                    .with_mut(a.id, contact, |c| c.trim_archived(*seq));
            }
        });
    }

    /// Every conversation (of one account, or all), for listing.
    pub fn conversations(&self, account: Option<u16>) -> Vec<ConversationView> {
        let mut found = Vec::new();
        self.conversations.for_each(|c| {
            if account.is_none_or(|a| a == c.account) {
                found.push((c.account, c.contact(), c.to_conversation(true)));
            }
        });
        // What is left under a BSUID linked to a phone number since (its
        // history until archived) is shown with the phone number's.
        found.retain(|(account, contact, _)| {
            !(super::contacts::is_bsuid(contact) && self.linked_phone(*account, contact).is_some())
        });
        found
            .into_iter()
            .filter_map(|(account, contact, conversation)| {
                Some(ConversationView {
                    account: self.account(account)?.name().to_string(),
                    wa_id: contact,
                    window: conversation.window,
                    conversation,
                })
            })
            .collect()
    }

    /// Set the rule state and, if given, replace the vars (API `PUT state`).
    pub fn put_state(
        &self,
        account: u16,
        contact: &str,
        state: Option<String>,
        vars: Option<BTreeMap<String, String>>,
        now: Millis,
    ) {
        self.update_conversation(account, contact, now, |c| {
            if let Some(s) = state {
                c.state = s;
            }
            if let Some(v) = vars {
                c.vars = v;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbound::InboundKind;

    const HOUR: Millis = 3_600_000;

    fn setup() -> (State, std::sync::Arc<Account>) {
        let s = State::for_test();
        let a = s.account_by_name("main").expect("the test account");
        (s, a)
    }

    #[test]
    fn the_first_message_opens_a_window_and_later_ones_only_extend_it() {
        let (s, a) = setup();
        let now = 100 * HOUR;
        let first = s.inbound(&a, &InboundMessage::test_text("w1", "1", "hi", now), now);
        assert!(first.new_conversation);
        assert!(s.window_open(a.id, "1", now + 23 * HOUR));
        assert!(!s.window_open(a.id, "1", now + 25 * HOUR));
        let later = now + HOUR;
        let second = s.inbound(
            &a,
            &InboundMessage::test_text("w2", "1", "again", later),
            later,
        );
        assert!(!second.new_conversation);
        assert!(s.window_open(a.id, "1", now + 24 * HOUR + 30 * 60_000));
        // A retried old message does not move the window back.
        s.inbound(
            &a,
            &InboundMessage::test_text("w0", "1", "old", now - 2 * HOUR),
            later,
        );
        assert!(s.window_open(a.id, "1", now + 24 * HOUR + 30 * 60_000));
    }

    #[test]
    fn reactions_do_not_open_a_window_but_are_in_the_history() {
        let (s, a) = setup();
        let reaction = InboundMessage {
            kind: InboundKind::Reaction,
            opens_window: false,
            ..InboundMessage::test_text("w1", "2", "👍", 1000)
        };
        let view = s.inbound(&a, &reaction, 1000);
        assert!(!view.new_conversation);
        assert!(!s.window_open(a.id, "2", 1000));
        assert_eq!(s.recent(a.id, "2").len(), 1);
    }

    #[test]
    fn history_keeps_the_last_fifty_and_counts_every_entry() {
        let (s, a) = setup();
        for n in 0..60 {
            let msg = InboundMessage::test_text(&format!("w{n}"), "3", "x", n);
            s.inbound(&a, &msg, n);
        }
        let recent = s.recent(a.id, "3");
        assert_eq!(recent.len(), RECENT);
        assert_eq!(recent.first().map(|r| r.id.as_str()), Some("w10"));
        let c = s.conversation(&a, "3").unwrap().conversation;
        assert_eq!(c.recent_seq, 60);
    }

    #[test]
    fn consent_follows_the_time_of_the_keyword_not_arrival() {
        let (s, a) = setup();
        let now = 10 * HOUR;
        assert!(s.set_opted_out(a.id, "4", false, now - HOUR, now));
        assert!(s.set_opted_out(a.id, "4", true, now - 60_000, now));
        // Meta retries an older START after the STOP: it changes nothing.
        assert!(!s.set_opted_out(a.id, "4", false, now - 2 * HOUR, now));
        assert!(s.is_opted_out(a.id, "4"));
    }

    #[test]
    fn an_expired_handoff_ends_with_the_next_message() {
        let (s, a) = setup();
        s.set_handoff(a.id, "5", Some(2000), 1000);
        assert!(
            s.inbound(&a, &InboundMessage::test_text("w1", "5", "x", 1500), 1500)
                .handoff
        );
        assert!(
            !s.inbound(&a, &InboundMessage::test_text("w2", "5", "x", 2500), 2500)
                .handoff
        );
    }

    #[test]
    fn vars_over_the_limit_are_not_set() {
        let (s, a) = setup();
        s.set_vars(a.id, "6", [("a".to_string(), "1".to_string())], 1);
        let big = "x".repeat(crate::domain::MAX_VARS_BYTES);
        s.set_vars(a.id, "6", [("b".to_string(), big)], 2);
        let vars = s.conversation(&a, "6").unwrap().conversation.vars;
        assert_eq!(
            vars.len(),
            1,
            "the whole update is refused, the old vars stay"
        );
    }
}
