//! Rebuilding the conversation state from the journal, and writing it out
//! whole for a snapshot. Restoring writes the maps directly: nothing is
//! journaled again. Outbound records are restored by
//! [`crate::outbound::store`], events by [`crate::events`].

use super::idempotency::Idempotent;
use super::ops::{ConversationWire, DirectionWire, InboundWire, StateOp};
use super::*;
use crate::persist::{Owner, encode};

/// What replay hands back to the app.
#[derive(Debug, Default)]
pub struct Restored {
    /// Inbound messages acknowledged before the stop whose rules had not run.
    pub pending: Vec<(Arc<Account>, InboundMessage, bool)>,
    pub conversations: usize,
}

impl State {
    /// The account a journaled object belongs to; in sandbox mode an
    /// unknown one is registered again.
    pub(crate) fn restore_account(&self, name: &str, sandbox: bool) -> Option<Arc<Account>> {
        if let Some(a) = self.account_by_name(name) {
            return Some(a);
        }
        if sandbox {
            return self.add_account(AccountSettings::sandbox(name));
        }
        tracing::warn!(
            account = name,
            "journal names an account that is no longer configured; its data is skipped"
        );
        None
    }

    /// Apply one journaled record (the JSON of a [`StateOp`]). `sandbox`:
    /// unknown accounts are registered.
    pub fn restore(&self, json: &[u8], sandbox: bool) -> Result<(), String> {
        let op: StateOp = serde_json::from_slice(json).map_err(|e| e.to_string())?;
        self.restore_op(op, sandbox);
        Ok(())
    }

    /// Apply a record another router of the cluster wrote (it is in the
    /// log): as a replay does, and history goes on to the archive as it
    /// does where it was written, so it leaves memory here too. Returns
    /// the inbound message the record acknowledged, if it is one (for this
    /// router's live stream).
    pub fn apply_remote(
        &self,
        json: &[u8],
        sandbox: bool,
    ) -> Result<Option<(String, InboundMessage)>, String> {
        let op: StateOp = serde_json::from_slice(json).map_err(|e| e.to_string())?;
        let acknowledged = match &op {
            StateOp::Pending {
                account, message, ..
            } => Some((account.clone(), InboundMessage::from((**message).clone()))),
            _ => None,
        };
        let history = match &op {
            StateOp::Recent {
                account,
                contact,
                seq,
                entry,
                ..
            } => Some((
                account.clone(),
                contact.clone(),
                *seq,
                Recent::from(entry.clone()),
            )),
            _ => None,
        };
        self.restore_op(op, sandbox);
        if let Some((account, contact, seq, entry)) = history {
            self.archive_recent(&account, &contact, seq, &entry);
        }
        Ok(acknowledged)
    }

    pub(crate) fn restore_op(&self, op: StateOp, sandbox: bool) {
        match op {
            StateOp::Account {
                name,
                phone_number_id,
            } => {
                if self.account_by_name(&name).is_none()
                    && self.account_by_pnid(&phone_number_id).is_none()
                {
                    let mut settings = AccountSettings::sandbox(&phone_number_id);
                    settings.name = name;
                    self.add_account(settings);
                }
            }
            StateOp::SeenDigest { digest, at } => {
                if let Some(d) = super::dedupe::digest_from_hex(&digest) {
                    self.dedupe.first_time_digest(d, at);
                }
            }
            StateOp::Seen { wamid, at } => {
                self.dedupe.first_time(&wamid, at);
            }
            StateOp::Window {
                account,
                contact,
                window,
            } => {
                if let Some(a) = self.restore_account(&account, sandbox) {
                    self.conversations
                        .upsert(a.id, &contact, |c| c.set_window(Some(window.into())));
                }
            }
            StateOp::Conversation {
                account,
                contact,
                conversation,
            } => {
                if let Some(a) = self.restore_account(&account, sandbox) {
                    self.conversations
                        .upsert(a.id, &contact, |n| conversation.apply(n));
                }
            }
            StateOp::Recent {
                account,
                contact,
                seq,
                entry,
                name,
                last_activity,
            } => {
                let Some(a) = self.restore_account(&account, sandbox) else {
                    return;
                };
                self.conversations.upsert(a.id, &contact, |c| {
                    // A snapshot taken after this entry was added holds it already.
                    if seq <= c.recent_seq() {
                        return;
                    }
                    let inbound = matches!(entry.direction, DirectionWire::In);
                    if name.is_some() {
                        c.set_name(name.as_deref());
                    }
                    c.last_activity = last_activity;
                    if inbound && c.handoff_until().is_some_and(|u| u <= last_activity) {
                        c.extra_mut().handoff_until = None;
                    }
                    c.push_recent(entry.into());
                    c.set_recent_seq(seq);
                });
            }
            StateOp::Idempotency {
                key,
                fingerprint,
                answer,
                at,
            } => {
                let mut fp = [0u8; 32];
                if hex::decode_to_slice(&fingerprint, &mut fp).is_ok() {
                    self.idempotency.insert(
                        key,
                        Idempotent {
                            fingerprint: fp,
                            answer,
                            at,
                        },
                    );
                }
            }
            StateOp::Pending {
                account,
                message,
                new_conversation,
                seen,
            } => {
                if let Some(at) = seen {
                    self.dedupe.first_time(&message.wamid, at);
                }
                let message = InboundMessage::from(*message);
                self.pending
                    .insert(message.wamid.clone(), (account, message, new_conversation));
            }
            StateOp::Done { wamid } => {
                self.pending.remove(wamid.as_str());
            }
            StateOp::ContactIds {
                account,
                contact,
                user_id,
                username,
            } => {
                if let Some(a) = self.restore_account(&account, sandbox) {
                    self.conversations.upsert(a.id, &contact, |n| {
                        super::contacts::set_ids(n, user_id.as_deref(), username.as_deref())
                    });
                }
            }
            StateOp::Template {
                name,
                language,
                status,
                category,
            } => {
                self.template_update(&name, &language, status.as_deref(), category.as_deref());
            }
            StateOp::Number {
                account,
                display_phone_number,
                upgraded,
            } => {
                if let Some(a) = self.restore_account(&account, sandbox) {
                    let number = super::accounts::Number {
                        display_phone_number,
                        upgraded,
                    };
                    self.restore_number(&a, number);
                }
            }
            StateOp::Link {
                account,
                user_id,
                wa_id,
            } => {
                if let Some(a) = self.restore_account(&account, sandbox) {
                    self.merge(a.id, &user_id, &wa_id, 0);
                    self.put_link(a.id, &user_id, &wa_id);
                }
            }
            StateOp::Renumber { account, from, to } => {
                if let Some(a) = self.restore_account(&account, sandbox) {
                    self.move_conversation(a.id, &from, &to, 0);
                }
            }
            StateOp::Forget { account, contact } => {
                if let Some(a) = self.account_by_name(&account) {
                    self.forget_conversation(a.id, &contact);
                }
            }
        }
    }

    /// The inbound messages of `account` acknowledged and not yet routed
    /// (a cluster router that takes the account over routes them).
    pub fn pending_of(&self, account: &Arc<Account>) -> Vec<(InboundMessage, bool)> {
        self.pending
            .iter()
            .filter(|e| e.value().0 == account.name())
            .map(|e| (e.value().1.clone(), e.value().2))
            .collect()
    }

    /// After the last op: hand back the pending inbound messages.
    pub fn finish_restore(&self, sandbox: bool) -> Restored {
        let mut out = Restored {
            conversations: self.conversations.len(),
            ..Restored::default()
        };
        let pending: Vec<(String, InboundMessage, bool)> =
            self.pending.iter().map(|e| e.value().clone()).collect();
        for (account, msg, new_conversation) in pending {
            if let Some(a) = self.restore_account(&account, sandbox) {
                out.pending.push((a, msg, new_conversation));
            }
        }
        out
    }

    /// The whole state as journal records, for a snapshot, one at a time
    /// (a snapshot of a million conversations is never all in memory).
    pub fn dump(&self, emit: &mut dyn FnMut(&[u8])) {
        let mut put = |op: StateOp| emit(&encode(Owner::State, &op));
        for a in self.accounts() {
            if a.is_sandbox() && a.settings.name == a.settings.phone_number_id {
                put(StateOp::Account {
                    name: a.name().to_string(),
                    phone_number_id: a.settings.phone_number_id.clone(),
                });
            }
        }
        for op in self.numbers() {
            put(op);
        }
        for (digest, at) in self.dedupe.entries() {
            put(StateOp::SeenDigest {
                digest: hex::encode(digest),
                at,
            });
        }
        self.conversations.for_each(|c| {
            let account = self.account_name(c.account);
            let contact = c.contact();
            if let Some(window) = c.window() {
                put(StateOp::Window {
                    account: account.clone(),
                    contact: contact.clone(),
                    window: window.into(),
                });
            }
            put(StateOp::Conversation {
                account,
                contact,
                conversation: Box::new(ConversationWire::new(&c.to_conversation(true), true)),
            });
        });
        for (name, language, t) in self.templates_known() {
            put(StateOp::Template {
                name,
                language,
                status: t.status,
                category: t.category,
            });
        }
        for (account, user_id, wa_id) in self.links() {
            put(StateOp::Link {
                account: self.account_name(account),
                user_id,
                wa_id,
            });
        }
        for i in self.idempotency.iter() {
            put(StateOp::Idempotency {
                key: i.key().clone(),
                fingerprint: hex::encode(i.fingerprint),
                answer: i.answer.clone(),
                at: i.at,
            });
        }
        for p in self.pending.iter() {
            let (account, message, new_conversation) = p.value().clone();
            put(StateOp::Pending {
                account,
                message: Box::new(InboundWire::from(&message)),
                new_conversation,
                seen: None,
            });
        }
    }

    /// [`State::dump`] collected (tests).
    #[cfg(test)]
    pub fn dump_ops(&self) -> Vec<Vec<u8>> {
        let mut ops = Vec::new();
        self.dump(&mut |b| ops.push(b.to_vec()));
        ops
    }
}

impl State {
    /// Drop what is past `retention` (SPEC §9 bounded growth):
    /// conversations idle that long whose window is closed — except
    /// opted-out contacts, whose consent is kept. Returns how many.
    pub fn prune(&self, now: Millis, retention: std::time::Duration) -> usize {
        let cutoff = now - retention.as_millis() as Millis;
        let mut old_convs: Vec<(u16, String)> = Vec::new();
        self.conversations.for_each(|c| {
            if c.last_activity < cutoff
                && !c.opted_out()
                && !c.window().is_some_and(|w| w.is_open(now))
            {
                old_convs.push((c.account, c.contact()));
            }
        });
        for (account, contact) in &old_convs {
            self.forget_conversation(*account, contact);
            self.log(|| StateOp::Forget {
                account: self.account_name(*account),
                contact: contact.clone(),
            });
        }
        old_convs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State::for_test()
    }

    /// History entry `n` of contact "1": inbound `wamid.n` at time `n`.
    fn recent_op(n: u64) -> StateOp {
        StateOp::Recent {
            account: "main".into(),
            contact: "1".into(),
            seq: n,
            entry: super::super::ops::RecentWire {
                direction: DirectionWire::In,
                id: format!("wamid.{n}"),
                kind: "text".into(),
                text: None,
                at: n as i64,
            },
            name: None,
            last_activity: n as i64,
        }
    }

    #[test]
    fn history_deltas_replayed_over_a_snapshot_that_holds_them_are_skipped() {
        let s = state();
        let account = s.account_by_name("main").unwrap();
        let msg = |n: u64| InboundMessage {
            contact_name: Some("Ana".into()),
            ..InboundMessage::test_text(&format!("wamid.{n}"), "1", &format!("m{n}"), n as i64)
        };
        // Live: three messages; capture the deltas the journal would get.
        let live = state();
        for n in 1..=3 {
            live.inbound(&live.account_by_name("main").unwrap(), &msg(n), n as i64);
        }
        let snapshot = live.dump_ops();
        // Replay: the snapshot (all three), then the log repeating 2 and 3
        // and adding 4.
        for record in &snapshot {
            let (_, json) = crate::persist::decode(record).unwrap();
            s.restore(json, false).unwrap();
        }
        for n in 2..=4u64 {
            s.restore_op(recent_op(n), false);
        }
        let ids: Vec<String> = s
            .recent(account.id, "1")
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, ["wamid.1", "wamid.2", "wamid.3", "wamid.4"]);
        let c = s.conversation(&account, "1").unwrap().conversation;
        assert_eq!((c.name.as_deref(), c.recent_seq), (Some("Ana"), 4));
    }

    /// A message's dedupe entry travels in its `Pending` record: replayed,
    /// the message is pending and a redelivery of it is a duplicate; a
    /// `Pending` of an older log (no `seen`, its `Seen` came before it)
    /// still makes it pending.
    #[test]
    fn a_pending_record_carries_its_dedupe_entry() {
        let s = state();
        let msg = |w: &str| InboundWire::from(&InboundMessage::test_text(w, "1", "hi", 5));
        s.restore_op(
            StateOp::Pending {
                account: "main".into(),
                message: Box::new(msg("wamid.new")),
                new_conversation: true,
                seen: Some(5_000),
            },
            false,
        );
        s.restore_op(
            StateOp::Pending {
                account: "main".into(),
                message: Box::new(msg("wamid.old")),
                new_conversation: false,
                seen: None,
            },
            false,
        );
        let account = s.account_by_name("main").unwrap();
        assert_eq!(s.pending_of(&account).len(), 2);
        assert!(
            !s.first_time("wamid.new", 6_000),
            "seen in its Pending record"
        );
        assert!(
            s.first_time("wamid.old", 6_000),
            "an old Pending says nothing of it"
        );
    }

    /// A cluster router applying another's history hands it to its own
    /// archive, and then drops it from memory, as the writer does.
    #[test]
    fn remote_history_goes_to_the_archive_and_leaves_memory() {
        let s = Arc::new(state());
        s.start_archiving();
        let account = s.account_by_name("main").unwrap();
        for n in 1..=3u64 {
            s.apply_remote(&serde_json::to_vec(&recent_op(n)).unwrap(), false)
                .unwrap();
        }
        s.archive().sync_blocking().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while s.conversations.with(account.id, "1", |c| c.recent_len()) != Some(0) {
            assert!(std::time::Instant::now() < deadline, "history left memory");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(s.archive().history("main", "1", 10).len(), 3);
        let ids: Vec<String> = s
            .recent(account.id, "1")
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, ["wamid.1", "wamid.2", "wamid.3"]);
    }

    #[test]
    fn prune_drops_idle_conversations_but_keeps_consent() {
        let s = state();
        let day = 86_400_000;
        let now = 100 * day;
        let idle = Conversation {
            last_activity: now - 40 * day,
            ..Conversation::default()
        };
        let opted = Conversation {
            last_activity: now - 40 * day,
            opted_out: true,
            ..Conversation::default()
        };
        for (contact, c) in [("1", idle), ("2", opted)] {
            s.restore_op(
                StateOp::Conversation {
                    account: "main".into(),
                    contact: contact.into(),
                    conversation: Box::new(ConversationWire::new(&c, true)),
                },
                false,
            );
        }
        assert_eq!(
            s.prune(now, std::time::Duration::from_millis(30 * day as u64)),
            1
        );
        let account = s.account_by_name("main").unwrap();
        assert!(s.conversation(&account, "1").is_none());
        assert!(s.conversation(&account, "2").is_some(), "opt-outs are kept");
    }
}
