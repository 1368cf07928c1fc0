//! From a verified notification to state changes, before the ack:
//! statuses are applied, inbound ids deduped, windows and conversation
//! history updated, and each new message queued in its conversation's
//! lane ([`crate::routing`]), which runs consent and rules after the ack.

use super::Ctx;
use super::payload::{AccountChange, Notification};
use crate::domain::now_ms;
use crate::outbound::StatusOutcome;
use crate::routing::Job;

/// What one notification did, for the ack and the metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub messages: usize,
    pub duplicates: usize,
    pub statuses: usize,
    pub unknown_accounts: usize,
}

/// What an account-level change changes: a template's status or category;
/// a contact's marketing preference or new BSUID (`account`: the account
/// the change names by its phone number id, if any); a number's throughput
/// upgrade (named by its display number).
fn account_change(ctx: &Ctx, change: &AccountChange, account: Option<&crate::state::Account>) {
    let v = &change.value;
    let text = |v: &serde_json::Value, k: &str| {
        v[k].as_str().filter(|s| !s.is_empty()).map(str::to_string)
    };
    let language = text(v, "message_template_language").unwrap_or_default();
    match change.field.as_str() {
        "message_template_status_update" => {
            if let Some(name) = text(v, "message_template_name") {
                let (event, category) = (text(v, "event"), text(v, "message_template_category"));
                tracing::info!(template = %name, %language, event = ?event, "template status from Meta");
                ctx.state
                    .template_update(&name, &language, event.as_deref(), category.as_deref());
            }
        }
        "template_category_update" => {
            if let Some(name) = text(v, "message_template_name") {
                let category = text(v, "new_category");
                ctx.state
                    .template_update(&name, &language, None, category.as_deref());
            }
        }
        "phone_number_quality_update" if v["event"] == "THROUGHPUT_UPGRADE" => {
            let number = text(v, "display_phone_number").unwrap_or_default();
            match ctx.state.throughput_upgrade(&number) {
                Some(a) => tracing::info!(
                    account = a.name(),
                    rate = a.rate(),
                    max_in_flight = a.max_in_flight(),
                    "Meta upgraded the number's throughput"
                ),
                None => tracing::warn!(
                    display_phone_number = %number,
                    "Meta upgraded the throughput of a number no notification named yet; its account keeps its rate"
                ),
            }
        }
        "user_preferences" => {
            let Some(account) = account else {
                return;
            };
            let now = now_ms();
            for p in v["user_preferences"].as_array().into_iter().flatten() {
                if p["category"] != "marketing_messages" {
                    continue;
                }
                let Some(contact) = text(p, "wa_id").or_else(|| text(p, "user_id")) else {
                    continue;
                };
                let contact = ctx.state.resolve_contact(account.id, &contact);
                match p["value"].as_str() {
                    Some("stop") => ctx
                        .state
                        .set_marketing_stop(account.id, &contact, true, now),
                    Some("resume") => ctx
                        .state
                        .set_marketing_stop(account.id, &contact, false, now),
                    _ => {}
                }
            }
        }
        "user_id_update" => {
            let Some(account) = account else {
                return;
            };
            let now = now_ms();
            for (wa_id, previous, current) in change.user_id_updates() {
                ctx.state
                    .new_user_id(account, wa_id, previous, current, now);
            }
        }
        _ => {}
    }
}

/// The account of a business number; in sandbox mode an unknown number
/// becomes one. SPEC §3: an unknown number in live mode is acked, counted
/// and ignored (`None`).
pub(super) fn account_for(
    ctx: &Ctx,
    phone_number_id: &str,
) -> Option<std::sync::Arc<crate::state::Account>> {
    let known = ctx.state.account_by_pnid(phone_number_id).or_else(|| {
        ctx.sandbox
            .then(|| ctx.state.register_sandbox(phone_number_id))
            .flatten()
    });
    if known.is_none() {
        tracing::warn!(%phone_number_id, "webhook for an unknown phone_number_id ignored");
        ctx.metrics.webhook("unknown_account");
    }
    known
}

/// Longest a notification that changes a contact's ids waits for the
/// rules of the contact's earlier messages.
const IDENTITY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Before a notification that changes a contact's number or BSUID is
/// applied: let the rules of the contact's earlier messages run (up to
/// [`IDENTITY_WAIT`]), so what they do lands in the conversation before it
/// moves and the contact's messages after the change find it moved.
pub async fn rules_before_identity_changes(ctx: &Ctx, notification: &Notification) {
    let mut barriers = Vec::new();
    for batch in &notification.batches {
        let changes = batch
            .messages
            .iter()
            .filter(|m| m.identity_change().is_some());
        for msg in changes {
            if let Some(account) = ctx.state.account_by_pnid(&batch.phone_number_id) {
                let contact = ctx.state.resolve_contact(account.id, &msg.from);
                barriers.push(ctx.lanes.barrier(account.id, &contact));
            }
        }
    }
    for change in &notification.account_changes {
        for (_, previous, _) in change.user_id_updates() {
            let account = change
                .phone_number_id
                .as_deref()
                .and_then(|p| ctx.state.account_by_pnid(p));
            if let Some(account) = account {
                let contact = ctx.state.resolve_contact(account.id, previous);
                barriers.push(ctx.lanes.barrier(account.id, &contact));
            }
        }
    }
    let deadline = tokio::time::Instant::now() + IDENTITY_WAIT;
    for barrier in barriers {
        let _ = tokio::time::timeout_at(deadline, barrier).await;
    }
}

/// The synchronous part of handling a notification: runs before the 200.
pub fn accept(ctx: &Ctx, notification: Notification) -> Accepted {
    let mut out = Accepted::default();
    let state = &ctx.state;
    let metrics = &ctx.metrics;
    for change in &notification.account_changes {
        let account = change
            .phone_number_id
            .as_deref()
            .and_then(|p| state.account_by_pnid(p));
        account_change(ctx, change, account.as_deref());
        metrics.webhook("account_change");
        ctx.events
            .account_update(change, account.as_ref().map(|a| a.name()));
    }
    for batch in notification.batches {
        let Some(account) = account_for(ctx, &batch.phone_number_id) else {
            out.unknown_accounts += 1;
            continue;
        };
        state.note_display_number(&account, &batch.display_phone_number);
        let now = now_ms();
        for status in &batch.statuses {
            match ctx.outbox.apply_status(status, now) {
                StatusOutcome::Applied { .. } => metrics.webhook("status_applied"),
                StatusOutcome::Ignored => metrics.webhook("status_ignored"),
                StatusOutcome::Unknown => metrics.webhook("status_unknown"),
            }
            out.statuses += 1;
        }
        for mut msg in batch.messages {
            if !state.first_time(&msg.wamid, now) {
                metrics.webhook("duplicate_message");
                out.duplicates += 1;
                continue;
            }
            metrics.inbound(msg.kind.as_str());
            // A contact's new number or BSUID (a `system` message): their
            // conversation follows.
            state.follow_identity(&account, &mut msg, now);
            // A BSUID linked to a phone number reaches that conversation.
            state.identify(&account, &mut msg, now);
            let view = state.inbound(&account, &msg, now);
            state.mark_pending(&account, &msg, view.new_conversation, now);
            out.messages += 1;
            ctx.lanes.push(Job {
                account: account.clone(),
                msg,
                new_conversation: view.new_conversation,
                replayed: false,
            });
        }
    }
    out
}
