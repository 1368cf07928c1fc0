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
