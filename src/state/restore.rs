//! Rebuilding the conversation state from the journal, and writing it out
//! whole for a snapshot. Restoring writes the maps directly: nothing is
//! journaled again. Outbound records are restored by
//! [`crate::outbound::store`], events by [`crate::events`].

use super::idempotency::Idempotent;
use super::*;
use crate::journal::Op;

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

    /// Apply one journaled op. `sandbox`: unknown accounts are registered.
    pub fn restore(&self, op: Op, sandbox: bool) {
        match op {
            Op::SnapshotOf { .. } => {}
            Op::Account {
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
            Op::Seen { wamid, at } => {
                self.dedupe.first_time(&wamid, at);
            }
            Op::Window {
                account,
                contact,
                window,
            } => {
                if let Some(a) = self.restore_account(&account, sandbox) {
                    self.windows.restore(ConvKey::new(a.id, &contact), window);
                }
            }
            Op::Conversation {
                account,
                contact,
                conversation,
            } => {
                if let Some(a) = self.restore_account(&account, sandbox) {
                    self.conversations
                        .insert(ConvKey::new(a.id, &contact), *conversation);
                }
            }
            Op::Idempotency {
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
            Op::Pending {
                account,
                message,
                new_conversation,
            } => {
                self.pending
                    .insert(message.wamid.clone(), (account, *message, new_conversation));
            }
            Op::Done { wamid } => {
                self.pending.remove(&wamid);
            }
            Op::Forget { account, contact } => {
                if let Some(a) = self.account_by_name(&account) {
                    let key = ConvKey::new(a.id, &contact);
                    self.conversations.remove(&key);
                    self.windows.remove(&key);
                }
            }
            // Records belong to the outbox, events to the event queues; the
            // app routes them there.
            Op::Record(_) | Op::ForgetRecord { .. } | Op::Event { .. } | Op::EventDone { .. } => {}
        }
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

    /// The whole state as ops, for a snapshot.
    pub fn dump_ops(&self) -> Vec<Op> {
        let mut ops = Vec::new();
        for a in self.accounts() {
            if a.is_sandbox() && a.settings.name == a.settings.phone_number_id {
                ops.push(Op::Account {
                    name: a.name().to_string(),
                    phone_number_id: a.settings.phone_number_id.clone(),
                });
            }
        }
        for (wamid, at) in self.dedupe.entries() {
            ops.push(Op::Seen { wamid, at });
        }
        for (key, window) in self.windows.entries() {
            ops.push(Op::Window {
                account: self.account_name(key.account),
                contact: key.contact.to_string(),
                window,
            });
        }
        for c in self.conversations.iter() {
            ops.push(Op::Conversation {
                account: self.account_name(c.key().account),
                contact: c.key().contact.to_string(),
                conversation: Box::new(c.value().clone()),
            });
        }
        for i in self.idempotency.iter() {
            ops.push(Op::Idempotency {
                key: i.key().clone(),
                fingerprint: hex::encode(i.fingerprint),
                answer: i.answer.clone(),
                at: i.at,
            });
        }
        for p in self.pending.iter() {
            let (account, message, new_conversation) = p.value().clone();
            ops.push(Op::Pending {
                account,
                message: Box::new(message),
                new_conversation,
            });
        }
        ops
    }
}

impl State {
    /// Drop what is past `retention` (SPEC §9 bounded growth):
    /// conversations idle that long whose window is closed — except
    /// opted-out contacts, whose consent is kept. Returns how many.
    pub fn prune(&self, now: Millis, retention: std::time::Duration) -> usize {
        let cutoff = now - retention.as_millis() as Millis;
        let old_convs: Vec<ConvKey> = self
            .conversations
            .iter()
            .filter(|c| {
                c.last_activity < cutoff && !c.opted_out && !self.windows.is_open(c.key(), now)
            })
            .map(|c| c.key().clone())
            .collect();
        for key in &old_convs {
            self.conversations.remove(key);
            self.windows.remove(key);
            self.log(|| Op::Forget {
                account: self.account_name(key.account),
                contact: key.contact.to_string(),
            });
        }
        old_convs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        let mut a = AccountSettings::sandbox("1");
        a.name = "main".into();
        State::new(&[a], Arc::new(crate::telemetry::Metrics::new())).0
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
            s.restore(
                Op::Conversation {
                    account: "main".into(),
                    contact: contact.into(),
                    conversation: Box::new(c),
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
