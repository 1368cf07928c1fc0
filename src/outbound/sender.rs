//! The paced sender: one task per account drains that account's FIFO,
//! at least `pace` between two sends, retrying the head of the queue on
//! transient errors so that order holds (SPEC §6).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::graph::GraphClient;
use super::graph::send_body;
use super::policy::{PolicyError, check_record};
use super::retry::{Class, classify, delay};
use super::store::Outbox;
use super::{RecordError, Status};
use crate::config::SenderSettings;
use crate::domain::{Millis, now_ms};
use crate::state::Account;

/// What the paced senders use.
pub struct Sender {
    pub outbox: Arc<Outbox>,
    pub graph: Arc<GraphClient>,
    /// `[sender]`: attempts, backoff.
    pub settings: SenderSettings,
}

/// What one attempt at the head of the queue came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecutionOutcome {
    /// Sent, or ended for good: take it off the queue.
    Done,
    /// Ended by policy without calling Meta (no pace used).
    Refused,
    /// Transient failure: try the same message again after this delay.
    Retry(Duration),
    /// Nothing to send (cancelled, unknown).
    Skipped,
}

/// Run the sender of `account` until `stop` turns true.
pub async fn run(sender: Arc<Sender>, account: Arc<Account>, mut stop: watch::Receiver<bool>) {
    let pace_ms = account.settings.pace.as_millis() as Millis;
    let queue = sender.outbox.queue(&account);
    loop {
        if *stop.borrow() {
            break;
        }
        let now = now_ms();
        let next_due = queue.promote_due(now);
        let Some(id) = queue.head() else {
            let wait = next_due.map_or(Duration::from_secs(3600), |t| {
                Duration::from_millis((t - now).max(1) as u64)
            });
            tokio::select! {
                _ = queue.notify.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                changed = stop.changed() => if changed.is_err() { break },
            }
            continue;
        };
        if let Some(last) = queue.last_send() {
            let due = last + pace_ms;
            if now < due {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis((due - now) as u64)) => {}
                    changed = stop.changed() => if changed.is_err() { break },
                }
                continue;
            }
        }
        match try_execute(&sender, &account, &id).await {
            ExecutionOutcome::Done | ExecutionOutcome::Refused | ExecutionOutcome::Skipped => {
                queue.remove(&id);
            }
            ExecutionOutcome::Retry(wait) => {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    changed = stop.changed() => if changed.is_err() { break },
                }
            }
        }
    }
}

/// One attempt at sending message `id` of `account`.
#[tracing::instrument(skip_all, fields(account = %account.name(), message_id = %id))]
pub async fn try_execute(sender: &Sender, account: &Account, id: &str) -> ExecutionOutcome {
    let state = &sender.outbox;
    let now = now_ms();
    let Some(record) = state.record(id) else {
        return ExecutionOutcome::Skipped;
    };
    if record.status != Status::Queued {
        return ExecutionOutcome::Skipped;
    }
    // SPEC §6: policy again at dispatch.
    if let Err(refused) = check_record(state.state(), account, &record, now) {
        state.update_record(id, now, |r| {
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
        tracing::info!(reason = refused.code(), "message not sent");
        return ExecutionOutcome::Refused;
    }
    // Only a message still queued may start sending (it may have been
    // cancelled since it was read).
    let Some(attempts) = state
        .update_record(id, now, |r| {
            if r.status != Status::Queued {
                return (None, None);
            }
            r.attempts += 1;
            (Some(Status::Sending), Some(r.attempts))
        })
        .flatten()
    else {
        return ExecutionOutcome::Skipped;
    };
    state.queue(account).mark_sent_now(now);
    // `sending` must be on disk before Meta is called: after a crash such a
    // message ends `interrupted` instead of being sent twice.
    if !state.state().sync().await {
        state.update_record(id, now, |_| (Some(Status::Queued), ()));
        tracing::error!("journal unavailable; sending paused");
        return ExecutionOutcome::Retry(Duration::from_secs(1));
    }

    let Some(token) = &account.settings.access_token else {
        // Sandbox: the same queue, pacing and states, no network (SPEC §2).
        let wamid = format!("wamid.sandbox.{}", uuid::Uuid::now_v7().simple());
        state.mark_sent(id, &wamid, now_ms());
        tracing::info!(%wamid, "sandbox message sent");
        return ExecutionOutcome::Done;
    };
    let body = send_body(&record.to, &record.content);
    match sender
        .graph
        .send(&account.settings.phone_number_id, token, &body)
        .await
    {
        Ok(wamid) => {
            state.mark_sent(id, &wamid, now_ms());
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
            let max = sender.settings.max_attempts;
            if classify(&e) == Class::Transient && attempts < max {
                let wait = delay(
                    attempts,
                    sender.settings.backoff,
                    e.retry_after(),
                    fastrand::f64(),
                );
                tracing::warn!(error = %error.message, attempts, retry_in_ms = wait.as_millis() as u64, "transient send failure");
                state.update_record(id, now, |r| {
                    r.error = Some(error);
                    (Some(Status::Queued), ())
                });
                ExecutionOutcome::Retry(wait)
            } else {
                tracing::warn!(error = %error.message, attempts, "send failed");
                // A 131047 also closes the window (in the outbox).
                state.mark_failed(id, error, now);
                ExecutionOutcome::Done
            }
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
        let state = Arc::new(State::new(&[a], metrics.clone()).0);
        let account = state.account_by_name("main").unwrap();
        let outbox = Arc::new(Outbox::new(state, metrics.clone(), false).0);
        let graph = GraphClient::new(graph, "v21.0", Duration::from_secs(2), metrics).unwrap();
        let settings = SenderSettings {
            max_attempts: 3,
            backoff: Duration::from_millis(100),
            timeout: Duration::from_secs(2),
            validity: Duration::from_secs(3600),
        };
        let sender = Sender {
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
                object: serde_json::json!({ "body": "hello" }),
                context_id: None,
            },
            source: "api".into(),
            tags: vec![],
            metadata: None,
            send_at: None,
            validity,
            bypass_consent: false,
            keep_refused: false,
            id: None,
        };
        enqueue(&sender.outbox, new, now).unwrap().id.into_string()
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
        let ExecutionOutcome::Retry(wait) = try_execute(&sender, &account, &id).await else {
            panic!("a transient failure is retried");
        };
        assert!(wait >= Duration::from_millis(100), "{wait:?}");
        let r = sender.outbox.record(&id).unwrap();
        assert_eq!((r.status, r.attempts), (Status::Queued, 1));
        assert_eq!(r.error.unwrap().code, "graph_error");
        assert_eq!(
            sender.outbox.queue(&account).head().as_deref(),
            Some(id.as_str())
        );
    }
}
