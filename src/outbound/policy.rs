//! Send policy (SPEC §6), checked when a message is accepted and again right
//! before it is sent: free-form needs an open window, opted-out contacts
//! get nothing, a message past its validity expires. None of these calls
//! Meta. [`enqueue`] is the one way into the queues.

use std::sync::Arc;
use std::time::Duration;

use super::store::Outbox;
use super::{Content, OutboundRecord, Status};
use crate::domain::Millis;
use crate::ids::{ContactId, MessageId, Wamid};
use crate::state::templates::TemplateBlock;
use crate::state::{Account, State};

/// Why a message may not be sent (now).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("the 24-hour window with this contact is closed: only template messages may be sent")]
    WindowClosed,
    #[error("the contact opted out; nothing is sent until they opt in again")]
    OptedOut,
    #[error("the message was not sent within its validity")]
    Expired,
    /// The account's queue holds `max_queue` messages; retry after this long.
    #[error("the account's queue is full; retry later")]
    QueueFull { retry_after: Duration },
    #[error(
        "the template is paused at Meta (message_template_status_update); nothing is sent with it until Meta reinstates it"
    )]
    TemplatePaused,
    #[error(
        "the template cannot be sent: Meta reported it disabled, rejected, deleted, archived or locked"
    )]
    TemplateUnavailable,
    #[error(
        "the contact stopped marketing messages in their WhatsApp settings; this is a marketing template"
    )]
    MarketingOptedOut,
}

impl PolicyError {
    pub fn code(self) -> &'static str {
        match self {
            PolicyError::WindowClosed => "window_closed",
            PolicyError::OptedOut => "opted_out",
            PolicyError::Expired => "expired",
            PolicyError::QueueFull { .. } => "queue_full",
            PolicyError::TemplatePaused => "template_paused",
            PolicyError::TemplateUnavailable => "template_unavailable",
            PolicyError::MarketingOptedOut => "marketing_opted_out",
        }
    }
}

/// The facts policy looks at.
#[derive(Debug, Clone, Copy)]
pub struct Facts {
    pub now: Millis,
    pub is_template: bool,
    pub window_open: bool,
    pub opted_out: bool,
    pub bypass_consent: bool,
    pub expires_at: Millis,
}

/// The policy decision, a pure function of the facts.
pub fn check(f: Facts) -> Result<(), PolicyError> {
    if f.now >= f.expires_at {
        return Err(PolicyError::Expired);
    }
    if f.opted_out && !f.bypass_consent {
        return Err(PolicyError::OptedOut);
    }
    if !f.is_template && !f.window_open {
        return Err(PolicyError::WindowClosed);
    }
    Ok(())
}

/// Check policy for a record of `account` now.
pub fn check_record(
    state: &State,
    account: &Account,
    r: &OutboundRecord,
    now: Millis,
) -> Result<(), PolicyError> {
    // What Meta reported of the template: one lookup, none while Meta
    // reported no template at all.
    if r.content.is_template()
        && state.knows_templates()
        && let Some(info) = {
            let (name, language) = r.content.template_key();
            state.template(&name, &language)
        }
    {
        match info.block() {
            Some(TemplateBlock::Paused) => return Err(PolicyError::TemplatePaused),
            Some(TemplateBlock::Unavailable) => return Err(PolicyError::TemplateUnavailable),
            None => {}
        }
        if info.is_marketing() && state.marketing_stopped(account.id, &r.to) {
            return Err(PolicyError::MarketingOptedOut);
        }
    }
    check(Facts {
        now,
        is_template: r.content.is_template(),
        window_open: state.window_open(account.id, &r.to, now),
        opted_out: state.is_opted_out(account.id, &r.to),
        bypass_consent: r.bypass_consent,
        expires_at: r.expires_at,
    })
}

/// A message to accept.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub account: Arc<Account>,
    pub to: ContactId,
    pub content: Content,
    /// `api` or `rule:NAME`.
    pub source: String,
    pub tags: Vec<String>,
    pub metadata: Option<crate::message::Object>,
    pub send_at: Option<Millis>,
    pub validity: Duration,
    /// Consent replies reach a contact who just opted out.
    pub bypass_consent: bool,
    /// Keep a refused message as a `failed` record (rules), rather than
    /// only answering the error (API).
    pub keep_refused: bool,
    /// A fixed id (rule replies: derived from the inbound message); a
    /// message with this id that already exists is not accepted twice.
    pub id: Option<MessageId>,
    /// With `id`: a message with it may have been made by an earlier
    /// process and archived since, so the archive is asked too (otherwise
    /// memory only, where every record of this process's making is until
    /// it settles).
    pub may_exist: bool,
    /// Show a typing indicator on this inbound message before sending.
    pub typing: Option<Wamid>,
}

/// What accepting a message gave.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub id: MessageId,
    pub status: Status,
    pub queue_position: usize,
    pub send_after: Millis,
}

/// Accept a message into its account's queue, or refuse it by policy.
/// A refused message is kept as a failed record when `keep_refused`; its id
/// comes back with the error.
pub fn enqueue(
    outbox: &Outbox,
    new: NewMessage,
    now: Millis,
) -> Result<Accepted, (PolicyError, Option<MessageId>)> {
    let account = new.account.clone();
    let pace = account.settings.pace;
    let state = outbox.state();
    let queue = outbox.queue(&account);
    if let Some(existing) = new
        .id
        .as_ref()
        .and_then(|id| outbox.existing_reply(id, new.may_exist))
    {
        // Already accepted (rules run again after a crash): same answer, no second message.
        return Ok(Accepted {
            id: existing.id,
            status: existing.status,
            queue_position: 0,
            send_after: existing.send_at.unwrap_or(existing.created_at),
        });
    }
    if queue.len() >= account.settings.max_queue {
        return Err((
            PolicyError::QueueFull {
                retry_after: pace.max(Duration::from_secs(1)),
            },
            None,
        ));
    }
    let send_at = new.send_at.filter(|t| *t > now);
    let start = send_at.unwrap_or(now);
    let expires_at = start + new.validity.as_millis() as Millis;
    let status = if send_at.is_some() {
        Status::Scheduled
    } else {
        Status::Queued
    };
    let mut record = OutboundRecord {
        id: new.id.clone().unwrap_or_else(MessageId::generate),
        account: account.name().into(),
        to: new.to,
        content: new.content,
        status,
        wamid: None,
        source: new.source,
        tags: new.tags,
        metadata: new.metadata,
        attempts: 0,
        error: None,
        history: vec![(status, now)],
        created_at: now,
        send_at,
        expires_at,
        bypass_consent: new.bypass_consent,
        typing: new.typing,
        pricing: None,
        conversation: None,
    };
    if let Err(refused) = check_record(state, &account, &record, now) {
        if !new.keep_refused {
            return Err((refused, None));
        }
        let id = record.id.clone();
        record.error = Some(super::RecordError {
            code: refused.code().into(),
            graph_code: None,
            message: refused.to_string(),
        });
        // It never entered the queue: its history is the refusal alone.
        record.status = Status::Failed;
        record.history = vec![(Status::Failed, now)];
        outbox.insert_record(&account, record, now);
        return Err((refused, Some(id)));
    }
    let id = record.id.clone();
    // Estimate before inserting: once inserted, the sender may take the
    // message at once and its own send would count against it.
    // A lower bound: one send start per spacing (pace, rate), after an
    // account pause; a contact's earlier messages may hold it longer.
    let spacing = account.spacing().as_millis() as Millis;
    let stats = queue.stats();
    let ahead = stats.depth.saturating_sub(stats.in_flight) as Millis;
    let next_free = queue
        .last_send()
        .map_or(now, |l| (l + spacing).max(now))
        .max(stats.paused_until.unwrap_or(0));
    let position = outbox.insert_record(&account, record, now);
    let send_after = send_at.unwrap_or(next_free + spacing * ahead);
    Ok(Accepted {
        id,
        status,
        queue_position: position,
        send_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts() -> Facts {
        Facts {
            now: 1000,
            is_template: false,
            window_open: true,
            opted_out: false,
            bypass_consent: false,
            expires_at: 2000,
        }
    }

    #[test]
    fn free_form_needs_an_open_window_templates_do_not() {
        assert_eq!(
            check(Facts {
                window_open: false,
                ..facts()
            }),
            Err(PolicyError::WindowClosed)
        );
        assert_eq!(
            check(Facts {
                window_open: false,
                is_template: true,
                ..facts()
            }),
            Ok(())
        );
    }

    #[test]
    fn opted_out_blocks_everything_but_consent_replies() {
        assert_eq!(
            check(Facts {
                opted_out: true,
                is_template: true,
                ..facts()
            }),
            Err(PolicyError::OptedOut)
        );
        assert_eq!(
            check(Facts {
                opted_out: true,
                bypass_consent: true,
                ..facts()
            }),
            Ok(())
        );
    }

    #[test]
    fn expiry_wins() {
        assert_eq!(
            check(Facts {
                now: 2000,
                opted_out: true,
                ..facts()
            }),
            Err(PolicyError::Expired)
        );
    }
}
