//! From a verified notification to state changes and rule runs.
//!
//! Before the ack ([`accept`]): statuses are applied, inbound ids deduped,
//! windows and conversation history updated. After the ack, one ordered
//! lane per conversation (hashed onto a fixed set of worker tasks) runs
//! consent keywords and the rules ([`process`]), so messages of one
//! conversation are handled in arrival order and different conversations
//! in parallel.

use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;

use tokio::sync::mpsc;

use super::payload::Notification;
use crate::app::Shared;
use crate::domain::now_ms;
use crate::inbound::InboundMessage;
use crate::outbound::StatusOutcome;
use crate::outbound::policy::NewMessage;
use crate::outbound::{Content, enqueue};
use crate::rules::{ConsentKeyword, Facts};
use crate::state::Account;

/// Number of ordered lanes (worker tasks) for rule processing.
pub const LANES: usize = 32;

/// One inbound message waiting for its rules.
pub struct Job {
    pub account: Arc<Account>,
    pub msg: InboundMessage,
    pub new_conversation: bool,
}

/// The senders of the lanes; workers are started by the app.
pub struct Lanes {
    senders: Vec<mpsc::UnboundedSender<Job>>,
    hasher: std::collections::hash_map::RandomState,
    /// Jobs pushed and not yet finished (queued or running).
    pending: Arc<std::sync::atomic::AtomicUsize>,
}

impl Lanes {
    pub fn new() -> (Self, Vec<mpsc::UnboundedReceiver<Job>>) {
        let (senders, receivers) = (0..LANES).map(|_| mpsc::unbounded_channel()).unzip();
        (
            Lanes {
                senders,
                hasher: Default::default(),
                pending: Default::default(),
            },
            receivers,
        )
    }

    pub fn push(&self, job: Job) {
        let mut h = self.hasher.build_hasher();
        job.account.id.hash(&mut h);
        job.msg.from.hash(&mut h);
        let lane = (h.finish() % self.senders.len() as u64) as usize;
        self.pending
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        if let Err(e) = self.senders[lane].send(job) {
            self.finished();
            // Only during shutdown, after the workers stopped.
            tracing::error!(wamid = %e.0.msg.wamid, "rule lane closed; message not routed");
        }
    }
}

impl Lanes {
    /// Inbound messages whose rules have not finished running.
    pub fn pending(&self) -> usize {
        self.pending.load(std::sync::atomic::Ordering::Acquire)
    }

    fn finished(&self) {
        self.pending
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// What one notification did, for the ack and the metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub messages: usize,
    pub duplicates: usize,
    pub statuses: usize,
    pub unknown_accounts: usize,
}

/// The synchronous part of handling a notification: runs before the 200.
pub fn accept(shared: &Shared, notification: Notification) -> Accepted {
    let mut out = Accepted::default();
    let state = &shared.state;
    let metrics = &shared.metrics;
    for batch in notification.batches {
        let known = state.account_by_pnid(&batch.phone_number_id).or_else(|| {
            shared
                .settings
                .sandbox
                .then(|| state.register_sandbox(&batch.phone_number_id))
                .flatten()
        });
        let account = match known {
            Some(a) => a,
            None => {
                // SPEC §3: unknown number in live mode → acked, counted, ignored.
                tracing::warn!(phone_number_id = %batch.phone_number_id, "webhook for an unknown phone_number_id ignored");
                metrics.webhook("unknown_account");
                out.unknown_accounts += 1;
                continue;
            }
        };
        let now = now_ms();
        for status in &batch.statuses {
            match shared.outbox.apply_status(status, now) {
                StatusOutcome::Applied { .. } => metrics.webhook("status_applied"),
                StatusOutcome::Ignored => metrics.webhook("status_ignored"),
                StatusOutcome::Unknown => metrics.webhook("status_unknown"),
            }
            out.statuses += 1;
        }
        for msg in batch.messages {
            if !state.first_time(&msg.wamid, now) {
                metrics.webhook("duplicate_message");
                out.duplicates += 1;
                continue;
            }
            metrics.inbound(msg.kind.as_str());
            let view = state.inbound(&account, &msg, now);
            state.mark_pending(&account, &msg, view.new_conversation);
            out.messages += 1;
            shared.lanes.push(Job {
                account: account.clone(),
                msg,
                new_conversation: view.new_conversation,
            });
        }
    }
    out
}

/// Run a lane: process its jobs in order until the channel closes.
pub async fn run_lane(shared: Arc<Shared>, mut jobs: mpsc::UnboundedReceiver<Job>) {
    while let Some(job) = jobs.recv().await {
        let wamid = job.msg.wamid.clone();
        process(&shared, job);
        shared.state.mark_done(&wamid);
        shared.lanes.finished();
    }
}

/// Consent keywords, handoff and rules for one inbound message.
#[tracing::instrument(skip_all, fields(account = %job.account.name(), message_id = %job.msg.wamid))]
pub fn process(shared: &Shared, job: Job) {
    let Job {
        account,
        msg,
        new_conversation,
    } = job;
    let state = &shared.state;
    let rules = shared.rules.get();
    let now = now_ms();
    let name = account.name().to_string();

    let conv = state
        .conversation(&account, &msg.from)
        .map(|c| c.conversation)
        .unwrap_or_default();
    let handed_off = conv.handoff_until.is_some_and(|u| u > now);

    if let Some(keyword) = rules.consent_keyword(&msg) {
        // SPEC §4: consent keywords are honoured even while handed off.
        // They count by the time the customer sent them: Meta retries for
        // days and out of order, so an older keyword arriving after a newer
        // one changes nothing and is not answered.
        let opted_out = keyword == ConsentKeyword::OptOut;
        let applied = state.set_opted_out(
            account.id,
            &msg.from,
            opted_out,
            msg.timestamp.min(now),
            now,
        );
        tracing::info!(opted_out, applied, "consent keyword");
        if !applied {
            shared.metrics.webhook("stale_consent_keyword");
        }
        if let Some(reply) = applied
            .then(|| rules.consent_reply(keyword, &msg, &name))
            .flatten()
        {
            match reply {
                Ok(content) => send(shared, &account, &msg, 0, content, "consent", true),
                Err(e) => tracing::error!(error = %e, "consent reply could not be rendered"),
            }
        }
    }
    if handed_off {
        // SPEC §4: handed off → no rules; every inbound message (consent
        // keywords too) still goes to the targets.
        tracing::debug!("conversation handed off; rules skipped");
        shared.metrics.rule_match("(handoff)");
        let view = state.conversation(&account, &msg.from);
        shared
            .events
            .message_received(None, &name, &msg, view.as_ref(), None);
        return;
    }
    if rules.consent_keyword(&msg).is_some() {
        return;
    }
    let reply_tags = match (&msg.context_id, rules.uses_reply_tags) {
        (Some(ctx), true) => shared.outbox.tags_of_wamid(ctx),
        _ => Vec::new(),
    };
    let facts = Facts {
        account: &name,
        state: &conv.state,
        new_conversation,
        reply_tags: &reply_tags,
    };
    let Some(hit) = rules.first_match(&msg, facts) else {
        shared.metrics.rule_match("(none)");
        return;
    };
    let plan = rules.plan(&hit, &msg, &name, &conv.state, &conv.vars);
    shared.metrics.rule_match(&plan.rule);
    tracing::info!(rule = %plan.rule, "rule matched");
    if let Some(s) = plan.set_state {
        state.set_state(account.id, &msg.from, s, now);
    }
    if !plan.set_vars.is_empty() {
        state.set_vars(account.id, &msg.from, plan.set_vars, now);
    }
    if plan.mark_read {
        mark_read(shared, &account, &msg.wamid);
    }
    let source = format!("rule:{}", plan.rule);
    for (slot, content) in plan.sends.into_iter().enumerate() {
        match content {
            Ok(content) => send(shared, &account, &msg, slot, content, &source, false),
            Err(e) => {
                tracing::error!(rule = %plan.rule, error = %e, "rule message could not be rendered; not sent")
            }
        }
    }
    if plan.handoff {
        let until = now + shared.settings.conversations.handoff_ttl.as_millis() as i64;
        state.set_handoff(account.id, &msg.from, Some(until), now);
    }
    if !plan.forward.is_empty() {
        // After state, vars and handoff are applied: the event shows them.
        let view = state.conversation(&account, &msg.from);
        shared.events.message_received(
            Some(&plan.forward),
            &name,
            &msg,
            view.as_ref(),
            Some(&plan.rule),
        );
    }
}

/// Queue reply number `slot` to `msg`. Its id is derived from the inbound
/// message, so rules run again after a crash cannot send it twice.
fn send(
    shared: &Shared,
    account: &Arc<Account>,
    msg: &InboundMessage,
    slot: usize,
    content: Content,
    source: &str,
    bypass_consent: bool,
) {
    let id = crate::domain::derived_id(
        "msg",
        msg.timestamp,
        &format!("{}|{}|{}", account.name(), msg.wamid, slot),
    );
    let new = NewMessage {
        id: Some(id),
        account: account.clone(),
        to: msg.from.clone(),
        content,
        source: source.to_string(),
        tags: Vec::new(),
        metadata: None,
        send_at: None,
        validity: shared.settings.sender.validity,
        bypass_consent,
        keep_refused: true,
    };
    if let Err((refused, id)) = enqueue(&shared.outbox, new, now_ms()) {
        tracing::info!(reason = refused.code(), message_id = ?id, "rule message refused by policy");
    }
}

fn mark_read(shared: &Shared, account: &Arc<Account>, wamid: &str) {
    let Some(token) = account.settings.access_token.clone() else {
        return;
    };
    let graph = shared.graph.clone();
    let pnid = account.settings.phone_number_id.clone();
    let wamid = wamid.to_string();
    shared.runtime.spawn(async move {
        if let Err(e) = graph.mark_read(&pnid, &token, &wamid).await {
            tracing::warn!(error = %e.describe(), "mark as read failed");
        }
    });
}
