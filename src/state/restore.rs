//! Rebuilding the state from the journal, and writing it out whole for a
//! snapshot. Restoring writes the maps directly: nothing is journaled again.

use std::sync::atomic::Ordering;

use super::*;
use crate::journal::Op;

/// What replay hands back to the app.
#[derive(Debug, Default)]
pub struct Restored {
    /// Inbound messages acknowledged before the stop whose rules had not run.
    pub pending: Vec<(Arc<Account>, InboundMessage, bool)>,
    /// Messages that were being sent when the router stopped: Meta may or
    /// may not have them; they end `failed` (`interrupted`), never resent.
    pub interrupted: usize,
    pub records: usize,
    pub conversations: usize,
}

/// Error code of a message whose send was cut by a crash.
pub const INTERRUPTED: &str = "interrupted";

impl State {
    fn restore_account(&self, name: &str, sandbox: bool) -> Option<Arc<Account>> {
        if let Some(a) = self.account_by_name(name) {
            return Some(a);
        }
        if sandbox {
            return Some(self.add_account(AccountSettings::sandbox(name)));
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
            Op::Record(record) => {
                if self.restore_account(&record.account, sandbox).is_some() {
                    self.records.insert(record.id.clone(), *record);
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
        }
    }

    /// After the last op: rebuild indexes and queues (acceptance order),
    /// settle interrupted sends, and hand back the pending inbound messages.
    pub fn finish_restore(&self, now: Millis, sandbox: bool) -> Restored {
        let mut out = Restored {
            records: self.records.len(),
            conversations: self.conversations.len(),
            ..Restored::default()
        };
        let mut queued: Vec<(Millis, String, String)> = Vec::new();
        let mut scheduled: Vec<(Millis, String, String)> = Vec::new();
        let mut interrupted = Vec::new();
        {
            let mut order = self.order.lock().expect("order lock");
            for r in self.records.iter() {
                order.insert(r.id.clone());
                if let Some(w) = &r.wamid {
                    self.by_wamid.insert(w.clone(), r.id.clone());
                }
                match r.status {
                    Status::Queued => queued.push((r.created_at, r.id.clone(), r.account.clone())),
                    Status::Scheduled => {
                        scheduled.push((r.send_at.unwrap_or(now), r.id.clone(), r.account.clone()))
                    }
                    Status::Sending => interrupted.push(r.id.clone()),
                    _ => {}
                }
            }
        }
        // SPEC §9: queues resume in their original order (ids sort by creation).
        queued.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        scheduled.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        for (_, id, account) in queued {
            if let Some(a) = self.account_by_name(&account) {
                a.queue.lock().ready.push_back(id);
            }
        }
        for (at, id, account) in scheduled {
            if let Some(a) = self.account_by_name(&account) {
                let seq = self.seq.fetch_add(1, Ordering::Relaxed);
                a.queue.lock().scheduled.insert((at, seq), id);
            }
        }
        for id in &interrupted {
            self.mark_failed(
                id,
                RecordError {
                    code: INTERRUPTED.into(),
                    graph_code: None,
                    message: "the router stopped while this message was being sent; WhatsApp may or may not have received it, so it is not sent again (retry it if needed)".into(),
                },
                now,
            );
        }
        out.interrupted = interrupted.len();
        let pending: Vec<(String, InboundMessage, bool)> =
            self.pending.iter().map(|e| e.value().clone()).collect();
        for (account, msg, new_conversation) in pending {
            if let Some(a) = self.restore_account(&account, sandbox) {
                out.pending.push((a, msg, new_conversation));
            }
        }
        for a in self.accounts() {
            a.queue.notify.notify_one();
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
        for r in self.records.iter() {
            ops.push(Op::Record(Box::new(r.value().clone())));
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
