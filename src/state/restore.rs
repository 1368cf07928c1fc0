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
            Op::Forget { account, contact } => {
                if let Some(a) = self.account_by_name(&account) {
                    let key = ConvKey::new(a.id, &contact);
                    self.conversations.remove(&key);
                    self.windows.remove(&key);
                }
            }
            Op::ForgetRecord { id } => {
                self.records.remove(&id);
            }
            // Events belong to the event queues; the app routes them there.
            Op::Event { .. } | Op::EventDone { .. } => {}
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
            let mut order = self.order.lock();
            for r in self.records.iter() {
                order.insert(r.id.clone());
                if let Some(a) = self.account_by_name(&r.account) {
                    a.records.fetch_add(1, Ordering::Relaxed);
                }
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

impl State {
    /// Drop what is past `retention` (SPEC §9 bounded growth): finished
    /// outbound records, and conversations idle that long whose window is
    /// closed — except opted-out contacts, whose consent is kept.
    /// Returns (records, conversations) removed.
    pub fn prune(&self, now: Millis, retention: std::time::Duration) -> (usize, usize) {
        let cutoff = now - retention.as_millis() as Millis;
        let old_records: Vec<(String, Option<String>)> = self
            .records
            .iter()
            .filter(|r| r.created_at < cutoff && r.status.is_settled())
            .map(|r| (r.id.clone(), r.wamid.clone()))
            .collect();
        for (id, wamid) in &old_records {
            self.forget_record(id, wamid.as_deref());
        }
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
        (old_records.len(), old_convs.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::Content;

    fn state() -> State {
        let mut a = AccountSettings::sandbox("1");
        a.name = "main".into();
        State::new(&[a], Arc::new(crate::telemetry::Metrics::new()), false).0
    }

    fn record(id: &str, status: Status, created_at: Millis) -> OutboundRecord {
        OutboundRecord {
            id: id.into(),
            account: "main".into(),
            to: "16315551181".into(),
            content: Content {
                kind: "text".into(),
                object: serde_json::json!({ "body": "x" }),
                context_id: None,
            },
            status,
            wamid: Some(format!("wamid.{id}")),
            source: "api".into(),
            tags: vec![],
            metadata: None,
            attempts: 1,
            error: None,
            history: vec![(status, created_at)],
            created_at,
            send_at: None,
            expires_at: created_at + 1000,
            bypass_consent: false,
        }
    }

    #[test]
    fn prune_drops_old_finished_records_and_idle_conversations_but_keeps_consent() {
        let s = state();
        let day = 86_400_000;
        let now = 100 * day;
        for (id, status, at) in [
            ("old", Status::Read, now - 40 * day),
            ("new", Status::Sent, now - day),
            ("stuck", Status::Queued, now - 40 * day),
        ] {
            s.restore(Op::Record(Box::new(record(id, status, at))), false);
        }
        let idle = Conversation {
            last_activity: now - 40 * day,
            ..Conversation::default()
        };
        let opted = Conversation {
            last_activity: now - 40 * day,
            opted_out: true,
            ..Conversation::default()
        };
        s.restore(
            Op::Conversation {
                account: "main".into(),
                contact: "1".into(),
                conversation: Box::new(idle),
            },
            false,
        );
        s.restore(
            Op::Conversation {
                account: "main".into(),
                contact: "2".into(),
                conversation: Box::new(opted),
            },
            false,
        );
        let (records, conversations) =
            s.prune(now, std::time::Duration::from_millis(30 * day as u64));
        assert_eq!((records, conversations), (1, 1));
        assert!(
            s.record("old").is_none() && s.record("new").is_some() && s.record("stuck").is_some()
        );
        let account = s.account_by_name("main").unwrap();
        assert!(s.conversation(&account, "1").is_none());
        assert!(s.conversation(&account, "2").is_some(), "opt-outs are kept");
    }

    #[test]
    fn restore_rebuilds_queues_in_acceptance_order_and_settles_interrupted_sends() {
        let s = state();
        for (id, status, at) in [
            ("b", Status::Queued, 20),
            ("a", Status::Queued, 10),
            ("c", Status::Sending, 5),
        ] {
            s.restore(Op::Record(Box::new(record(id, status, at))), false);
        }
        let restored = s.finish_restore(1000, false);
        assert_eq!(restored.interrupted, 1);
        let account = s.account_by_name("main").unwrap();
        assert_eq!(account.queue.head().as_deref(), Some("a"));
        let c = s.record("c").unwrap();
        assert_eq!(c.status, Status::Failed);
        assert_eq!(c.error.unwrap().code, INTERRUPTED);
    }

    fn delivered(wamid: &str) -> crate::inbound::StatusUpdate {
        crate::inbound::StatusUpdate {
            wamid: wamid.into(),
            status: "delivered".into(),
            timestamp: 0,
            recipient: None,
            error: None,
        }
    }

    /// Issue #7.11: statuses of messages other apps sent from the number
    /// used to fill the early-status map for good.
    #[test]
    fn early_statuses_expire_and_make_room() {
        let s = state();
        let t0 = 1_000_000;
        for i in 0..ORPHAN_CAPACITY {
            s.apply_status(&delivered(&format!("wamid.other.{i}")), t0);
        }
        let later = t0 + ORPHAN_TTL_MS + 1;
        s.restore(
            Op::Record(Box::new(record("mine", Status::Sending, later))),
            false,
        );
        assert_eq!(
            s.apply_status(&delivered("wamid.mine"), later),
            StatusOutcome::Unknown
        );
        s.mark_sent("mine", "wamid.mine", later);
        assert_eq!(s.record("mine").unwrap().status, Status::Delivered);
        assert!(
            s.orphans.len() < ORPHAN_CAPACITY,
            "expired entries were dropped"
        );
    }

    /// Issue #7.11: a status that races with the send answer is applied.
    #[test]
    fn a_status_racing_the_send_answer_is_never_lost() {
        let s = state();
        let n = 10_000;
        for i in 0..n {
            s.restore(
                Op::Record(Box::new(record(&format!("r{i}"), Status::Sending, 1))),
                false,
            );
        }
        let go = std::sync::Barrier::new(2);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                for i in 0..n {
                    go.wait();
                    s.apply_status(&delivered(&format!("wamid.r{i}x")), 10);
                }
            });
            scope.spawn(|| {
                for i in 0..n {
                    go.wait();
                    s.mark_sent(&format!("r{i}"), &format!("wamid.r{i}x"), 10);
                }
            });
        });
        for i in 0..n {
            assert_eq!(
                s.record(&format!("r{i}")).unwrap().status,
                Status::Delivered,
                "record r{i}"
            );
        }
    }
}
