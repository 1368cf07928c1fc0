//! The paced, pipelined sender: one task per account starts sends on the
//! account's schedule — at least `pace` apart and at most `rate` a second —
//! without waiting for earlier answers, up to `max_in_flight` at once. The
//! queue ([`super::queue`]) keeps order: per contact strictly one message
//! after the other (the next starts after the previous one's answer), across
//! contacts in acceptance order. A transient failure is retried first of
//! its contact after backoff; Meta's rate limits (429, 130429, `Retry-After`)
//! pause the whole account, the pair rate limit (131056) only the contact.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::graph::GraphClient;
use super::graph::send_body;
use super::policy::{PolicyError, check_record};
use super::queue::{AccountQueue, Finished};
use super::retry::{AccountLimit, Class, account_limit, classify, delay, least_wait};
use super::store::Outbox;
use super::{OutboundRecord, RecordError, Status};
use crate::config::SenderSettings;
use crate::domain::{Millis, now_ms};
use crate::state::Account;

/// Whether this router may send for an account now (cluster lease).
pub type Owns = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// What the paced senders use.
pub struct Sender {
    pub outbox: Arc<Outbox>,
    pub graph: Arc<GraphClient>,
    /// `[sender]`: attempts, backoff.
    pub settings: SenderSettings,
    /// In a cluster: whether this router holds the account's lease now;
    /// sends start only while it does. `None`: always (one router).
    pub owns: Option<Owns>,
}

/// What one attempt at a message came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecutionOutcome {
    /// Sent, or ended for good: take it off the queue.
    Done,
    /// Ended by policy without calling Meta (no pace used).
    Refused,
    /// Transient failure: try the same message again after `wait`, before
    /// the contact's later ones; `account`: what Meta asked of the whole
    /// number.
    Retry {
        wait: Duration,
        account: AccountLimit,
    },
    /// Nothing to send (cancelled, unknown).
    Skipped,
}

impl ExecutionOutcome {
    fn finished(&self, now: Millis) -> Finished {
        match self {
            ExecutionOutcome::Retry { wait, account } => Finished::Retry {
                until: now + wait.as_millis() as Millis,
                pause: *account == AccountLimit::Pause,
                slow_down: *account == AccountLimit::SlowDown,
            },
            _ => Finished::Done,
        }
    }
}

/// A message ready to go: policy passed and `sending` recorded.
pub struct Prepared {
    record: OutboundRecord,
    attempts: u32,
}

/// Run the sender of `account` until `stop` turns true.
pub async fn run(sender: Arc<Sender>, account: Arc<Account>, mut stop: watch::Receiver<bool>) {
    let pace = account.settings.pace.as_millis() as Millis;
    let mut rate_now = account.rate();
    let mut rate = RateSlots::new(rate_now);
    let queue = sender.outbox.queue(&account);
    loop {
        if *stop.borrow() {
            break;
        }
        if let Some(owns) = &sender.owns
            && !owns(account.name())
        {
            // Another router sends for this account; taking the lease
            // over wakes the queue.
            queue.hold_until(now_ms() + 250);
            if !sleep_until(250, Some(&queue), &mut stop).await {
                break;
            }
            continue;
        }
        let now = now_ms();
        let rate_in_force = account.rate();
        if rate_in_force != rate_now {
            // Meta upgraded the number (and the file sets no `rate`).
            rate_now = rate_in_force;
            rate = RateSlots::new(rate_now);
        }
        let next_due = queue.promote_due(now);
        if queue.take_slow_downs() > 0 {
            rate.slow_down(now);
        }
        // Not before the account's pause ends and the schedule allows:
        // `pace` after the last start, and a free `rate` slot.
        let not_before = queue
            .paused_until(now)
            .or_else(|| queue.last_send().map(|l| l + pace).filter(|t| *t > now))
            .or_else(|| rate.next(now));
        if let Some(t) = not_before {
            // Waiting for the schedule, not for the router (`max_backlog`).
            queue.hold_until(t);
            if !sleep_until(t - now, None, &mut stop).await {
                break;
            }
            continue;
        }
        let started = if queue.in_flight() < account.max_in_flight().max(1) {
            queue.take()
        } else {
            None
        };
        let Some((id, contact)) = started else {
            // Nothing may start: wait for news (a new message, an answer)
            // or the next scheduled message or contact wait.
            let wait = next_due.map_or(3_600_000, |t| (t - now).max(1));
            if !sleep_until(wait, Some(&queue), &mut stop).await {
                break;
            }
            continue;
        };
        match prepare(&sender, &account, &id, now) {
            Err(outcome) => queue.finish(&contact, &id, outcome.finished(now)),
            Ok(prepared) => {
                queue.mark_sent_now(now);
                rate.take(now);
                let (sender, account, queue) = (sender.clone(), account.clone(), queue.clone());
                // Boxed: the send's state (some 2 KB, hyper's request
                // included) is copied once, into the box; unboxed, tokio
                // copied it into the task and its whole cell again when
                // the task ended.
                tokio::spawn(Box::pin(async move {
                    let outcome = execute(&sender, &account, prepared).await;
                    queue.finish(&contact, &id, outcome.finished(now_ms()));
                    queue.notify.notify_one();
                }));
            }
        }
    }
}

/// The `rate` schedule as a token bucket: a start takes a token, tokens
/// come back at `rate` a second, and the bucket holds at most a tenth of a
/// second of them (at least one). Timers wake a millisecond or two late;
/// sleeping `1/rate` after each start would halve a rate of 1,000/s, while
/// the bucket lets a late wake-up start what the rate allowed meanwhile.
/// At low rates (below 10/s) it holds one token: starts are strictly
/// `1/rate` apart. Meta's rate limit halves the rate (at most once a
/// second, down to 1/s); it then grows back by a twentieth of `rate` every
/// 100 ms.
struct RateSlots {
    per_ms: f64,
    full_per_ms: f64,
    capacity: f64,
    tokens: f64,
    at: f64,
    slowed_at: f64,
}

impl RateSlots {
    fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        RateSlots {
            per_ms: rate / 1000.0,
            full_per_ms: rate / 1000.0,
            capacity: (rate / 10.0).max(1.0),
            tokens: 1.0,
            at: 0.0,
            slowed_at: f64::MIN,
        }
    }

    fn refill(&mut self, now: Millis) {
        let now = now as f64;
        if now > self.at {
            let elapsed = now - self.at;
            self.tokens = (self.tokens + elapsed * self.per_ms).min(self.capacity);
            self.per_ms =
                (self.per_ms + self.full_per_ms * 0.05 * elapsed / 100.0).min(self.full_per_ms);
            self.at = now;
        }
    }

    /// Meta said the number sends too fast.
    fn slow_down(&mut self, now: Millis) {
        self.refill(now);
        if (now as f64) - self.slowed_at >= 1000.0 {
            self.per_ms = (self.per_ms / 2.0).max(0.001);
            self.tokens = self.tokens.min(1.0);
            self.slowed_at = now as f64;
        }
    }

    /// When the next start is allowed, if not now.
    fn next(&mut self, now: Millis) -> Option<Millis> {
        self.refill(now);
        (self.tokens < 1.0).then(|| now + ((1.0 - self.tokens) / self.per_ms).ceil() as Millis)
    }

    /// A start now takes a token.
    fn take(&mut self, now: Millis) {
        self.refill(now);
        self.tokens -= 1.0;
    }
}

/// Sleep `ms`, or until `queue` is notified; `false` when told to stop.
async fn sleep_until(
    ms: Millis,
    queue: Option<&AccountQueue>,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let sleep = tokio::time::sleep(Duration::from_millis(ms.max(0) as u64));
    let notified = async {
        match queue {
            Some(q) => q.notify.notified().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = sleep => true,
        _ = notified => true,
        changed = stop.changed() => changed.is_ok() && !*stop.borrow(),
    }
}

/// Make message `id` ready to send now: policy again (SPEC §6), then
/// `sending`. `Err`: it is not sent (refused, expired, cancelled).
pub fn prepare(
    sender: &Sender,
    account: &Account,
    id: &str,
    now: Millis,
) -> Result<Prepared, ExecutionOutcome> {
    let outbox = &sender.outbox;
    let record = outbox
        .record(id)
        .filter(|r| r.status == Status::Queued)
        .ok_or(ExecutionOutcome::Skipped)?;
    if let Err(refused) = check_record(outbox.state(), account, &record, now) {
        outbox.update_record(id, now, |r| {
            if r.status != Status::Queued {
                return (None, ());
            }
            if refused == PolicyError::Expired {
                return (Some(Status::Expired), ());
            }
            r.error = Some(RecordError {
                code: refused.code().into(),
                graph_code: None,
                message: refused.to_string(),
            });
            (Some(Status::Failed), ())
        });
        tracing::info!(account = %account.name(), message_id = %id, reason = refused.code(), "message not sent");
        return Err(ExecutionOutcome::Refused);
    }
    // Only a message still queued may start sending (it may have been
    // cancelled since it was read).
    let attempts = outbox
        .update_record(id, now, |r| {
            if r.status != Status::Queued {
                return (None, None);
            }
            r.attempts += 1;
            (Some(Status::Sending), Some(r.attempts))
        })
        .flatten()
        .ok_or(ExecutionOutcome::Skipped)?;
    Ok(Prepared { record, attempts })
}

/// Send a prepared message and record what came of it.
#[tracing::instrument(skip_all, fields(account = %account.name(), message_id = %prepared.record.id))]
pub async fn execute(sender: &Sender, account: &Account, prepared: Prepared) -> ExecutionOutcome {
    let Prepared { record, attempts } = prepared;
    let outbox = &sender.outbox;
    let id = record.id.as_str();
    // `sending` must be on disk before Meta is called: after a crash such a
    // message ends `interrupted` instead of being sent twice.
    if !outbox.state().sync().await {
        outbox.update_record(id, now_ms(), |_| (Some(Status::Queued), ()));
        tracing::error!("journal unavailable; sending paused");
        return ExecutionOutcome::Retry {
            wait: Duration::from_secs(1),
            account: AccountLimit::Pause,
        };
    }
    let Some(token) = &account.settings.access_token else {
        // Sandbox: the same queue, pacing and states, no network (SPEC §2).
        let wamid = format!("wamid.sandbox.{}", uuid::Uuid::now_v7().simple());
        outbox.mark_sent(id, &wamid, now_ms());
        tracing::info!(%wamid, "sandbox message sent");
        return ExecutionOutcome::Done;
    };
    if attempts == 1
        && let Some(inbound) = &record.typing
    {
        // Right before the reply it precedes, in the reply's pace slot; a
        // failure is logged, and never retried (a retry of the reply
        // goes without it).
        if let Err(e) = sender
            .graph
            .mark_read(&account.settings.phone_number_id, token, inbound, true)
            .await
        {
            tracing::warn!(error = %e.describe(), "typing indicator failed");
        }
    }
    let body = send_body(&record.to, &record.content);
    match sender
        .graph
        .send(&account.settings.phone_number_id, token, &body)
        .await
    {
        Ok(wamid) => {
            outbox.mark_sent(id, &wamid, now_ms());
            tracing::info!(%wamid, attempts, "message sent");
            ExecutionOutcome::Done
        }
        Err(e) => {
            let now = now_ms();
            let error = RecordError {
                code: "graph_error".into(),
                graph_code: e.graph_code(),
                message: e.describe(),
            };
            if classify(&e) == Class::Transient && attempts < sender.settings.max_attempts {
                let backoff = sender.settings.backoff;
                let wait = delay(attempts, backoff, least_wait(&e, backoff), fastrand::f64());
                let account = account_limit(&e);
                tracing::warn!(error = %error.message, attempts, retry_in_ms = wait.as_millis() as u64, account = ?account, "transient send failure");
                outbox.update_record(id, now, |r| {
                    r.error = Some(error);
                    (Some(Status::Queued), ())
                });
                ExecutionOutcome::Retry { wait, account }
            } else {
                tracing::warn!(error = %error.message, attempts, "send failed");
                // A 131047 also closes the window (in the outbox).
                outbox.mark_failed(id, error, now);
                ExecutionOutcome::Done
            }
        }
    }
}

/// One attempt at message `id` of `account`, start to end (no pipelining):
/// prepare, take the pace slot, send.
pub async fn try_execute(sender: &Sender, account: &Account, id: &str) -> ExecutionOutcome {
    let now = now_ms();
    match prepare(sender, account, id, now) {
        Err(outcome) => outcome,
        Ok(prepared) => {
            sender.outbox.queue(account).mark_sent_now(now);
            execute(sender, account, prepared).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AccountSettings;
    use crate::domain::Secret;
    use crate::inbound::InboundMessage;
    use crate::message::{Content, MessageType};
    use crate::outbound::policy::{NewMessage, enqueue};
    use crate::state::State;
    use crate::telemetry::Metrics;

    /// A sender over one account; `token` makes it a live account whose
    /// Graph API is at `graph` (nothing listens there in these tests).
    fn setup(token: Option<&str>, graph: &str) -> (Sender, Arc<Account>) {
        let mut a = AccountSettings::sandbox("1");
        a.name = "main".into();
        a.access_token = token.map(Secret::new);
        let metrics = Arc::new(Metrics::new());
        let archive = Arc::new(crate::archive::Archive::open(None).unwrap());
        let state = Arc::new(State::new(&[a], metrics.clone(), archive).0);
        let account = state.account_by_name("main").unwrap();
        let outbox = Arc::new(Outbox::new(state, metrics.clone()).0);
        let graph = GraphClient::new(
            graph,
            "v21.0",
            crate::config::GraphHttp::Http1,
            Duration::from_secs(2),
            metrics,
        )
        .unwrap();
        let settings = SenderSettings {
            max_attempts: 3,
            backoff: Duration::from_millis(100),
            timeout: Duration::from_secs(2),
            validity: Duration::from_secs(3600),
        };
        let sender = Sender {
            owns: None,
            outbox,
            graph: Arc::new(graph),
            settings,
        };
        (sender, account)
    }

    /// Open the window of contact "1" and queue a text to it.
    fn queue_text(sender: &Sender, account: &Arc<Account>, validity: Duration) -> String {
        let now = now_ms();
        let state = sender.outbox.state();
        state.inbound(
            account,
            &InboundMessage::test_text("w.in", "1", "hi", now),
            now,
        );
        let new = NewMessage {
            account: account.clone(),
            to: "1".into(),
            content: Content {
                kind: MessageType::Text,
                object: serde_json::json!({ "body": "hello" }).into(),
                context_id: None,
            },
            source: "api".into(),
            tags: vec![],
            metadata: None,
            send_at: None,
            validity,
            bypass_consent: false,
            keep_refused: false,
            may_exist: false,
            typing: None,
            id: None,
        };
        enqueue(&sender.outbox, new, now).unwrap().id.into_string()
    }

    #[test]
    fn rate_slots_hold_the_rate_and_catch_up_late_wakeups_within_a_tenth_of_a_second() {
        let mut r = RateSlots::new(1000);
        r.take(0);
        let mut starts = 1;
        // Woken every 2 ms (a late timer): still 1,000 starts a second.
        for now in (0..1000).step_by(2) {
            while r.next(now).is_none() {
                r.take(now);
                starts += 1;
            }
        }
        assert!((999..=1001).contains(&starts), "{starts}");
        // After a long pause, at most a tenth of a second of slots at once.
        let mut burst = 0;
        while r.next(5000).is_none() {
            r.take(5000);
            burst += 1;
        }
        assert!((100..=101).contains(&burst), "{burst}");
        let mut slow = RateSlots::new(4);
        slow.take(0);
        assert_eq!(slow.next(0), Some(250));
    }

    #[test]
    fn a_rate_limit_halves_the_rate_which_then_grows_back() {
        let mut r = RateSlots::new(1000);
        r.slow_down(1000);
        r.slow_down(1100); // within a second: counted once
        assert!((r.per_ms - 0.5).abs() < 0.06, "{}", r.per_ms);
        r.slow_down(2000);
        assert!(r.per_ms < 0.6, "{}", r.per_ms);
        r.refill(5000);
        assert_eq!(r.per_ms, 1.0, "back to the full rate");
    }

    #[tokio::test]
    async fn a_sandbox_send_is_marked_sent_and_uses_the_pace_slot() {
        let (sender, account) = setup(None, "http://127.0.0.1:9");
        let id = queue_text(&sender, &account, Duration::from_secs(60));
        assert_eq!(
            try_execute(&sender, &account, &id).await,
            ExecutionOutcome::Done
        );
        let r = sender.outbox.record(&id).unwrap();
        assert_eq!(r.status, Status::Sent);
        assert!(r.wamid.unwrap().starts_with("wamid.sandbox."));
        assert!(sender.outbox.queue(&account).last_send().is_some());
        // A second attempt at the same id does nothing.
        assert_eq!(
            try_execute(&sender, &account, &id).await,
            ExecutionOutcome::Skipped
        );
    }

    #[tokio::test]
    async fn policy_is_checked_again_at_dispatch_without_calling_meta() {
        let (sender, account) = setup(Some("token"), "http://127.0.0.1:9");
        let id = queue_text(&sender, &account, Duration::from_secs(60));
        sender
            .outbox
            .state()
            .close_window(account.id, "1", now_ms());
        assert_eq!(
            try_execute(&sender, &account, &id).await,
            ExecutionOutcome::Refused
        );
        let r = sender.outbox.record(&id).unwrap();
        assert_eq!(r.status, Status::Failed);
        assert_eq!(r.error.unwrap().code, "window_closed");
        assert_eq!(r.attempts, 0, "Meta was not called");
        assert!(
            sender.outbox.queue(&account).last_send().is_none(),
            "no pace used"
        );

        let expired = queue_text(&sender, &account, Duration::from_secs(60));
        // Its validity ran out while it waited.
        sender.outbox.update_record(&expired, now_ms(), |r| {
            r.expires_at = 0;
            (None, ())
        });
        assert_eq!(
            try_execute(&sender, &account, &expired).await,
            ExecutionOutcome::Refused
        );
        assert_eq!(
            sender.outbox.record(&expired).unwrap().status,
            Status::Expired
        );
    }

    #[tokio::test]
    async fn a_cancelled_message_is_skipped() {
        let (sender, account) = setup(None, "http://127.0.0.1:9");
        let id = queue_text(&sender, &account, Duration::from_secs(60));
        sender.outbox.cancel(&id, now_ms()).unwrap();
        assert_eq!(
            try_execute(&sender, &account, &id).await,
            ExecutionOutcome::Skipped
        );
        assert_eq!(sender.outbox.record(&id).unwrap().status, Status::Cancelled);
    }

    #[tokio::test]
    async fn an_unreachable_graph_api_is_retried_with_the_message_queued_again() {
        // Port 9 (discard) on loopback: connection refused, a transient error.
        let (sender, account) = setup(Some("token"), "http://127.0.0.1:9");
        let id = queue_text(&sender, &account, Duration::from_secs(60));
        let ExecutionOutcome::Retry {
            wait,
            account: AccountLimit::None,
        } = try_execute(&sender, &account, &id).await
        else {
            panic!("a transient failure is retried");
        };
        assert!(wait >= Duration::from_millis(100), "{wait:?}");
        let r = sender.outbox.record(&id).unwrap();
        assert_eq!((r.status, r.attempts), (Status::Queued, 1));
        assert_eq!(r.error.unwrap().code, "graph_error");
        assert_eq!(
            sender.outbox.queue(&account).peek().as_deref(),
            Some(id.as_str())
        );
    }
}
