//! The FIFO of one account (SPEC §6): ready message ids in acceptance
//! order, scheduled ones by send time, and when the number last sent.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::domain::Millis;
use crate::ids::MessageId;

/// The FIFO of one account: ready message ids, and scheduled ones by time.
#[derive(Debug)]
pub struct AccountQueue {
    inner: Mutex<QueueInner>,
    /// Woken when something is queued.
    pub notify: Notify,
    /// Unix ms of the last send attempt (-1: none yet).
    last_send: AtomicI64,
    /// Outbound records of this account held in memory (`max_records`).
    pub(crate) records: AtomicUsize,
}

#[derive(Debug, Default)]
pub(crate) struct QueueInner {
    pub(crate) ready: VecDeque<MessageId>,
    pub(crate) scheduled: BTreeMap<(Millis, u64), MessageId>,
}

/// A queue's numbers for `/v1/queues` and `/metrics`.
#[derive(Debug, Clone)]
pub struct QueueStats {
    pub depth: usize,
    pub scheduled: usize,
    pub next_scheduled: Option<Millis>,
    pub last_send: Option<Millis>,
}

impl Default for AccountQueue {
    fn default() -> Self {
        AccountQueue {
            inner: Mutex::default(),
            notify: Notify::new(),
            last_send: AtomicI64::new(-1),
            records: AtomicUsize::new(0),
        }
    }
}

impl AccountQueue {
    pub(crate) fn lock(&self) -> parking_lot::MutexGuard<'_, QueueInner> {
        self.inner.lock()
    }

    pub fn stats(&self) -> QueueStats {
        let q = self.lock();
        let last = self.last_send.load(Ordering::Relaxed);
        QueueStats {
            depth: q.ready.len(),
            scheduled: q.scheduled.len(),
            next_scheduled: q.scheduled.keys().next().map(|(t, _)| *t),
            last_send: (last >= 0).then_some(last),
        }
    }

    /// Queued + scheduled.
    pub fn len(&self) -> usize {
        let q = self.lock();
        q.ready.len() + q.scheduled.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The message at the head of the ready queue.
    pub fn head(&self) -> Option<MessageId> {
        self.lock().ready.front().cloned()
    }

    /// Move scheduled messages that are due into the ready queue, in
    /// `send_at` order; returns when the next scheduled one is due.
    pub fn promote_due(&self, now: Millis) -> Option<Millis> {
        let mut q = self.lock();
        while let Some((&(at, seq), _)) = q.scheduled.iter().next() {
            if at > now {
                return Some(at);
            }
            if let Some(id) = q.scheduled.remove(&(at, seq)) {
                q.ready.push_back(id);
            }
        }
        None
    }

    pub fn mark_sent_now(&self, now: Millis) {
        self.last_send.store(now, Ordering::Relaxed);
    }

    pub fn last_send(&self) -> Option<Millis> {
        let v = self.last_send.load(Ordering::Relaxed);
        (v >= 0).then_some(v)
    }

    /// Remove `id` (sent, failed or cancelled); whether it was there.
    pub fn remove(&self, id: &str) -> bool {
        let mut q = self.lock();
        if let Some(pos) = q.ready.iter().position(|x| x == id) {
            q.ready.remove(pos);
            return true;
        }
        let key = q
            .scheduled
            .iter()
            .find(|(_, v)| v.as_str() == id)
            .map(|(k, _)| *k);
        key.and_then(|k| q.scheduled.remove(&k)).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scheduled_messages_join_the_ready_queue_in_send_at_order_when_due() {
        let q = AccountQueue::default();
        {
            let mut inner = q.lock();
            inner.ready.push_back("msg_a".into());
            inner.scheduled.insert((300, 0), "msg_late".into());
            inner.scheduled.insert((200, 1), "msg_early".into());
        }
        assert_eq!(q.promote_due(100), Some(200), "nothing due yet");
        assert_eq!(q.stats().depth, 1);
        assert_eq!(q.promote_due(300), None);
        let order: Vec<String> = q.lock().ready.iter().map(|id| id.to_string()).collect();
        assert_eq!(order, ["msg_a", "msg_early", "msg_late"]);
        assert_eq!(q.head().as_deref(), Some("msg_a"));
    }

    #[test]
    fn remove_takes_a_message_from_either_queue() {
        let q = AccountQueue::default();
        q.lock().ready.push_back("msg_a".into());
        q.lock().scheduled.insert((5, 0), "msg_s".into());
        assert_eq!(q.len(), 2);
        assert!(q.remove("msg_s"));
        assert!(q.remove("msg_a"));
        assert!(!q.remove("msg_a"));
        assert!(q.is_empty());
        assert_eq!(q.last_send(), None);
        q.mark_sent_now(42);
        assert_eq!(q.stats().last_send, Some(42));
    }
}
