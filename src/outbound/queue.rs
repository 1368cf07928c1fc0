//! The queue of one account (SPEC §6), built for pipelined sending.
//!
//! Messages wait per contact, in acceptance order. A contact is *ready*
//! when its first message may start: nothing of that contact is in flight
//! and it is not waiting out a retry or Meta's pair rate limit. The sender
//! starts the ready contact whose first message was accepted earliest, so
//! across contacts messages start in acceptance order, and per contact
//! strictly one after the other: a contact's next message starts only after
//! the previous one got its answer (a reply never overtakes the message it
//! follows). Scheduled messages join at their `send_at`. The whole account
//! can be paused (Meta's 429 / 130429 / `Retry-After`).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::domain::Millis;
use crate::ids::{ContactId, MessageId};

/// The queue of one account: see the module documentation.
#[derive(Debug)]
pub struct AccountQueue {
    inner: Mutex<QueueInner>,
    /// Woken when something is queued or a send ends.
    pub notify: Notify,
    /// Unix ms of the last send start (-1: none yet).
    last_send: AtomicI64,
    /// The sender waits for its schedule (pace, rate, an account pause or
    /// another router's lease) until this Unix ms: what is ready then is
    /// not work the router has fallen behind on.
    held_until: AtomicI64,
    /// Outbound records of this account held, in memory and archived (`max_records`).
    pub(crate) records: AtomicUsize,
}

#[derive(Debug, Default)]
struct QueueInner {
    contacts: HashMap<ContactId, ContactQueue, foldhash::fast::RandomState>,
    /// Ready contacts by the acceptance number of their first message.
    ready: BTreeSet<(u64, ContactId)>,
    /// Contacts waiting until a time (retry backoff, pair rate limit).
    waiting: BTreeSet<(Millis, ContactId)>,
    /// Scheduled messages by (send_at, acceptance number).
    scheduled: BTreeMap<(Millis, u64), (MessageId, ContactId)>,
    /// Messages waiting per contact (in flight ones included).
    queued: usize,
    in_flight: usize,
    next_seq: u64,
    /// No send starts before this (account-wide backoff).
    paused_until: Millis,
    /// Rate limits answered since the sender last looked.
    slow_downs: usize,
}

#[derive(Debug, Default)]
struct ContactQueue {
    /// (acceptance number, id), first to go first.
    items: VecDeque<(u64, MessageId)>,
    /// Its first message is being sent.
    busy: bool,
    /// Not before this (0: no wait).
    blocked_until: Millis,
}

/// How a send that [`AccountQueue::take`] started came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// Sent, or ended for good (or not sendable): off the queue.
    Done,
    /// To be tried again, first of its contact, not before `until`; with
    /// `pause`, no send of the account starts before then either; with
    /// `slow_down`, the account's sender halves its rate.
    Retry {
        until: Millis,
        pause: bool,
        slow_down: bool,
    },
}

/// A queue's numbers for `/v1/queues` and `/metrics`.
#[derive(Debug, Clone)]
pub struct QueueStats {
    /// Queued messages, those being sent included.
    pub depth: usize,
    pub scheduled: usize,
    pub in_flight: usize,
    pub next_scheduled: Option<Millis>,
    pub last_send: Option<Millis>,
    /// When a pause of the whole account (Meta's rate limit) ends.
    pub paused_until: Option<Millis>,
}

impl Default for AccountQueue {
    fn default() -> Self {
        AccountQueue {
            inner: Mutex::default(),
            notify: Notify::new(),
            last_send: AtomicI64::new(-1),
            held_until: AtomicI64::new(0),
            records: AtomicUsize::new(0),
        }
    }
}

impl QueueInner {
    fn push_ready(&mut self, contact: ContactId, id: MessageId) -> usize {
        let seq = self.next_seq;
        self.next_seq += 1;
        let c = self.contacts.entry(contact.clone()).or_default();
        c.items.push_back((seq, id));
        if c.items.len() == 1 && !c.busy && c.blocked_until == 0 {
            self.ready.insert((seq, contact));
        }
        self.queued += 1;
        self.queued
    }

    /// Put `contact` back among the ready ones if it may go and has work;
    /// drop its entry when it has none.
    fn settle(&mut self, contact: &ContactId) {
        let Some(c) = self.contacts.get(contact) else {
            return;
        };
        if c.busy || c.blocked_until != 0 {
            return;
        }
        match c.items.front() {
            Some(&(seq, _)) => {
                self.ready.insert((seq, contact.clone()));
            }
            None => {
                self.contacts.remove(contact);
            }
        }
    }
}

impl AccountQueue {
    /// Queue `id` for `contact` behind everything accepted before it.
    /// Returns its position in the account's queue (1 = next).
    pub fn push(&self, contact: ContactId, id: MessageId) -> usize {
        self.inner.lock().push_ready(contact, id)
    }

    /// Keep `id` until `at`, then queue it.
    pub fn schedule(&self, at: Millis, contact: ContactId, id: MessageId) {
        let mut q = self.inner.lock();
        let seq = q.next_seq;
        q.next_seq += 1;
        q.scheduled.insert((at, seq), (id, contact));
    }

    pub fn stats(&self) -> QueueStats {
        let q = self.inner.lock();
        let last = self.last_send.load(Ordering::Relaxed);
        QueueStats {
            depth: q.queued,
            scheduled: q.scheduled.len(),
            in_flight: q.in_flight,
            next_scheduled: q.scheduled.keys().next().map(|(t, _)| *t),
            last_send: (last >= 0).then_some(last),
            paused_until: (q.paused_until > 0).then_some(q.paused_until),
        }
    }

    /// Queued + scheduled.
    pub fn len(&self) -> usize {
        let q = self.inner.lock();
        q.queued + q.scheduled.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn in_flight(&self) -> usize {
        self.inner.lock().in_flight
    }

    /// The message [`take`](Self::take) would start next, if any.
    pub fn peek(&self) -> Option<MessageId> {
        let q = self.inner.lock();
        let (_, contact) = q.ready.first()?;
        q.contacts
            .get(contact)?
            .items
            .front()
            .map(|(_, id)| id.clone())
    }

    /// Move what is due into the queue: scheduled messages whose `send_at`
    /// has come (in `send_at` order) and contacts whose wait is over; end
    /// an account pause that is over. Returns when the next of these is due.
    pub fn promote_due(&self, now: Millis) -> Option<Millis> {
        let mut q = self.inner.lock();
        while let Some((&(at, seq), _)) = q.scheduled.iter().next() {
            if at > now {
                break;
            }
            if let Some((id, contact)) = q.scheduled.remove(&(at, seq)) {
                q.push_ready(contact, id);
            }
        }
        while let Some((until, contact)) = q.waiting.first().cloned() {
            if until > now {
                break;
            }
            q.waiting.remove(&(until, contact.clone()));
            if let Some(c) = q.contacts.get_mut(&contact)
                && c.blocked_until == until
            {
                c.blocked_until = 0;
            }
            q.settle(&contact);
        }
        if q.paused_until != 0 && q.paused_until <= now {
            q.paused_until = 0;
        }
        let next = [
            q.scheduled.keys().next().map(|(t, _)| *t),
            q.waiting.first().map(|(t, _)| *t),
            (q.paused_until > 0).then_some(q.paused_until),
        ];
        next.into_iter().flatten().min()
    }

    /// When the account is paused, until when.
    pub fn paused_until(&self, now: Millis) -> Option<Millis> {
        let q = self.inner.lock();
        (q.paused_until > now).then_some(q.paused_until)
    }

    /// Start the next message: the first message of the ready contact
    /// accepted earliest. Its contact is busy until [`finish`](Self::finish).
    pub fn take(&self) -> Option<(MessageId, ContactId)> {
        let mut q = self.inner.lock();
        let (_, contact) = q.ready.pop_first()?;
        let c = q.contacts.get_mut(&contact)?;
        let id = c.items.front()?.1.clone();
        c.busy = true;
        q.in_flight += 1;
        Some((id, contact))
    }

    /// A send that [`take`](Self::take) started has ended.
    pub fn finish(&self, contact: &ContactId, id: &str, how: Finished) {
        let mut q = self.inner.lock();
        q.in_flight = q.in_flight.saturating_sub(1);
        let mut removed = false;
        if let Some(c) = q.contacts.get_mut(contact) {
            c.busy = false;
            match how {
                Finished::Done => {
                    // (A cancel may have taken it off already.)
                    if c.items.front().is_some_and(|(_, x)| x == id) {
                        c.items.pop_front();
                        removed = true;
                    }
                }
                Finished::Retry { until, .. } => c.blocked_until = until,
            }
        }
        if removed {
            q.queued -= 1;
        }
        if let Finished::Retry {
            until,
            pause,
            slow_down,
        } = how
        {
            q.waiting.insert((until, contact.clone()));
            if pause {
                q.paused_until = q.paused_until.max(until);
            }
            if slow_down {
                q.slow_downs += 1;
            }
        }
        q.settle(contact);
    }

    /// Forget every waiting message (a cluster router taking over the
    /// account rebuilds the queue from the records). Sends in flight end
    /// as usual; a pause of the account stays.
    pub fn clear(&self) {
        let mut q = self.inner.lock();
        let paused_until = q.paused_until;
        *q = QueueInner {
            paused_until,
            ..QueueInner::default()
        };
    }

    /// Rate limits answered since the last call (the sender slows down).
    pub fn take_slow_downs(&self) -> usize {
        std::mem::take(&mut self.inner.lock().slow_downs)
    }

    pub fn mark_sent_now(&self, now: Millis) {
        self.last_send.store(now, Ordering::Relaxed);
    }

    /// The sender starts nothing before `until` (its pace, rate, a pause
    /// or another router's lease say so).
    pub fn hold_until(&self, until: Millis) {
        self.held_until.store(until, Ordering::Relaxed);
    }

    /// Ready messages that the router could start now and has not: 0 while
    /// the sender waits for its schedule (see [`hold_until`](Self::hold_until))
    /// or the account is paused, else the ready contacts.
    pub fn overdue(&self, now: Millis) -> usize {
        if self.held_until.load(Ordering::Relaxed) > now {
            return 0;
        }
        let q = self.inner.lock();
        if q.paused_until > now {
            return 0;
        }
        q.ready.len()
    }

    pub fn last_send(&self) -> Option<Millis> {
        let v = self.last_send.load(Ordering::Relaxed);
        (v >= 0).then_some(v)
    }

    /// Remove `id` of `contact` (cancelled); whether it was there. A
    /// message being sent stays until its send ends.
    pub fn remove(&self, contact: &str, id: &str) -> bool {
        let mut q = self.inner.lock();
        let key = q
            .scheduled
            .iter()
            .find(|(_, (x, _))| x == id)
            .map(|(k, _)| *k);
        if let Some(k) = key {
            q.scheduled.remove(&k);
            return true;
        }
        let contact = ContactId::from(contact);
        let Some(c) = q.contacts.get_mut(&contact) else {
            return false;
        };
        let Some(pos) = c.items.iter().position(|(_, x)| x == id) else {
            return false;
        };
        if pos == 0 && c.busy {
            return false;
        }
        let (seq, _) = c.items.remove(pos).expect("the position was found");
        q.queued -= 1;
        if pos == 0 {
            q.ready.remove(&(seq, contact.clone()));
            q.settle(&contact);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q_with(items: &[(&str, &str)]) -> AccountQueue {
        let q = AccountQueue::default();
        for (contact, id) in items {
            q.push((*contact).into(), (*id).into());
        }
        q
    }

    /// `a`'s send of `id` answered with a wait for the whole account.
    fn pause_after(q: &AccountQueue, id: &str, until: Millis) {
        let how = Finished::Retry {
            until,
            pause: true,
            slow_down: false,
        };
        q.finish(&"a".into(), id, how);
    }

    fn take(q: &AccountQueue) -> Option<String> {
        q.take().map(|(id, _)| id.to_string())
    }

    #[test]
    fn contacts_go_in_acceptance_order_and_each_one_message_at_a_time() {
        let q = q_with(&[("a", "a1"), ("b", "b1"), ("a", "a2"), ("c", "c1")]);
        assert_eq!(take(&q).as_deref(), Some("a1"));
        assert_eq!(take(&q).as_deref(), Some("b1"));
        // a2 waits for a1's answer; c1 is next.
        assert_eq!(take(&q).as_deref(), Some("c1"));
        assert_eq!(take(&q), None);
        assert_eq!(q.in_flight(), 3);
        q.finish(&"a".into(), "a1", Finished::Done);
        assert_eq!(take(&q).as_deref(), Some("a2"));
        for (c, id) in [("b", "b1"), ("c", "c1"), ("a", "a2")] {
            q.finish(&c.into(), id, Finished::Done);
        }
        assert_eq!((q.len(), q.in_flight()), (0, 0));
        assert!(
            q.inner.lock().contacts.is_empty(),
            "no empty contact entries left"
        );
    }

    #[test]
    fn a_retry_keeps_the_contacts_order_and_waits() {
        let q = q_with(&[("a", "a1"), ("a", "a2"), ("b", "b1")]);
        assert_eq!(take(&q).as_deref(), Some("a1"));
        q.finish(
            &"a".into(),
            "a1",
            Finished::Retry {
                until: 100,
                pause: false,
                slow_down: true,
            },
        );
        assert_eq!(q.take_slow_downs(), 1);
        assert_eq!(q.take_slow_downs(), 0);
        // Only a waits: b goes on.
        assert_eq!(take(&q).as_deref(), Some("b1"));
        assert_eq!(take(&q), None);
        assert_eq!(q.promote_due(50), Some(100));
        assert_eq!(take(&q), None);
        assert_eq!(q.promote_due(100), None);
        assert_eq!(take(&q).as_deref(), Some("a1"), "a1 again before a2");
    }

    #[test]
    fn an_account_retry_pauses_the_account() {
        let q = q_with(&[("a", "a1"), ("b", "b1")]);
        assert_eq!(take(&q).as_deref(), Some("a1"));
        pause_after(&q, "a1", 100);
        assert_eq!(q.paused_until(50), Some(100));
        assert_eq!(q.promote_due(100), None);
        assert_eq!(q.paused_until(100), None);
    }

    #[test]
    fn ready_messages_are_overdue_unless_the_schedule_or_a_pause_holds_them() {
        let q = q_with(&[("a", "a1"), ("a", "a2"), ("b", "b1")]);
        assert_eq!(q.overdue(10), 2, "a and b may start");
        q.hold_until(50);
        assert_eq!(q.overdue(10), 0, "the sender waits for its pace or rate");
        assert_eq!(q.overdue(50), 2, "its start is late");
        assert_eq!(take(&q).as_deref(), Some("a1"));
        assert_eq!(q.overdue(60), 1, "a is busy");
        pause_after(&q, "a1", 100);
        assert_eq!(q.overdue(60), 0, "paused");
    }

    #[test]
    fn scheduled_messages_join_in_send_at_order_when_due() {
        let q = q_with(&[("a", "msg_a")]);
        q.schedule(300, "b".into(), "msg_late".into());
        q.schedule(200, "c".into(), "msg_early".into());
        assert_eq!(q.promote_due(100), Some(200), "nothing due yet");
        assert_eq!(q.stats().depth, 1);
        assert_eq!(q.promote_due(300), None);
        let order: Vec<String> = std::iter::from_fn(|| take(&q)).collect();
        assert_eq!(order, ["msg_a", "msg_early", "msg_late"]);
    }

    #[test]
    fn remove_takes_a_waiting_or_scheduled_message_but_not_one_in_flight() {
        let q = q_with(&[("a", "a1"), ("a", "a2"), ("b", "b1")]);
        q.schedule(5, "c".into(), "s1".into());
        assert_eq!(q.len(), 4);
        assert!(q.remove("c", "s1"));
        assert!(q.remove("b", "b1"));
        assert_eq!(take(&q).as_deref(), Some("a1"));
        assert!(!q.remove("a", "a1"), "being sent");
        assert!(q.remove("a", "a2"));
        assert!(!q.remove("a", "a2"));
        q.finish(&"a".into(), "a1", Finished::Done);
        assert!(q.is_empty());
        assert_eq!(q.last_send(), None);
        q.mark_sent_now(42);
        assert_eq!(q.stats().last_send, Some(42));
    }
}
