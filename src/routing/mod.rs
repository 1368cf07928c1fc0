//! CORE: the routing step applied. After the ack, each inbound message
//! waits in its conversation's lane ([`lanes`]); a lane worker asks the
//! pure [`crate::rules::route::route`] what to do and carries it out here:
//! consent changes, state and vars, rule sends through
//! [`crate::outbound::enqueue`], handoff and events.

pub mod lanes;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::domain::now_ms;
use crate::events::Events;
use crate::ids::{MessageId, Wamid};
use crate::inbound::InboundMessage;
use crate::outbound::graph::GraphClient;
use crate::outbound::policy::NewMessage;
use crate::outbound::{Content, Outbox, enqueue};
use crate::rules::route::{ConversationFacts, Outcome, route};
use crate::rules::{ConsentKeyword, Rules};
use crate::state::{Account, State};
use crate::telemetry::Metrics;
pub use lanes::{Item, Job, LANES, Lanes};

/// What the routing step uses.
pub struct Router {
    pub state: Arc<State>,
    pub outbox: Arc<Outbox>,
    pub rules: Arc<Rules>,
    pub metrics: Arc<Metrics>,
    pub events: Arc<Events>,
    pub graph: Arc<GraphClient>,
    pub lanes: Arc<Lanes>,
    /// `[sender] validity` of rule replies.
    pub validity: Duration,
    /// `[conversations] handoff_ttl` of a rule's `handoff`.
    pub handoff_ttl: Duration,
}

/// Run a lane: process its jobs in order until the channel closes.
pub async fn run_lane(router: Arc<Router>, mut jobs: mpsc::UnboundedReceiver<Item>) {
    while let Some(item) = jobs.recv().await {
        let job = match item {
            Item::Job(job) => job,
            Item::Barrier(reached) => {
                let _ = reached.send(());
                continue;
            }
        };
        let wamid = job.msg.wamid.clone();
        // The live stream (the console) sees every inbound message as the
        // rules left its conversation.
        let streamed = router
            .events
            .streaming()
            .then(|| (job.account.clone(), job.msg.clone()));
        router.process(job);
        if let Some((account, msg)) = streamed {
            let view = router.state.conversation(&account, &msg.from);
            router
                .events
                .stream_inbound(account.name(), &msg, view.as_ref());
        }
        router.state.mark_done(&wamid);
        router.lanes.finished();
    }
}

/// The inbound message rule replies answer.
#[derive(Clone, Copy)]
struct ReplyTo<'a> {
    account: &'a Arc<Account>,
    msg: &'a InboundMessage,
    /// Replayed after a restart (see [`Job::replayed`]).
    replayed: bool,
}

impl Router {
    /// Consent keywords, handoff and rules for one inbound message.
    #[tracing::instrument(skip_all, fields(account = %job.account.name(), message_id = %job.msg.wamid))]
    pub fn process(&self, job: Job) {
        let Job {
            account,
            msg,
            new_conversation,
            replayed,
        } = job;
        let reply_to = ReplyTo {
            account: &account,
            msg: &msg,
            replayed,
        };
        let state = &self.state;
        let rules = self.rules.get();
        let now = now_ms();
        let name = account.name();

        // Not the whole conversation: its history is not needed here.
        let conv = state.routing_facts(account.id, &msg.from);
        let reply_tags = match (&msg.context_id, rules.uses_reply_tags) {
            (Some(ctx), true) => self.outbox.tags_of_wamid(ctx),
            _ => Vec::new(),
        };
        let decision = route(
            &rules,
            &msg,
            ConversationFacts {
                account: name,
                state: &conv.state,
                vars: &conv.vars,
                new_conversation,
                handed_off: conv.handoff_until.is_some_and(|u| u > now),
                reply_tags: &reply_tags,
            },
        );

        if let Some(consent) = decision.consent {
            // They count by the time the customer sent them: Meta retries
            // for days and out of order, so an older keyword arriving after
            // a newer one changes nothing and is not answered.
            let opted_out = consent.keyword == ConsentKeyword::OptOut;
            let applied = state.set_opted_out(
                account.id,
                &msg.from,
                opted_out,
                msg.timestamp.min(now),
                now,
            );
            tracing::info!(opted_out, applied, "consent keyword");
            if !applied {
                self.metrics.webhook("stale_consent_keyword");
            }
            match consent.reply.filter(|_| applied) {
                Some(Ok(content)) => self.send(&reply_to, 0, content, "consent", true, None),
                Some(Err(e)) => tracing::error!(error = %e, "consent reply could not be rendered"),
                None => {}
            }
        }
        let plan = match decision.outcome {
            Outcome::HandedOff => {
                // SPEC §4: handed off → no rules; every inbound message
                // (consent keywords too) still goes to the targets.
                tracing::debug!("conversation handed off; rules skipped");
                self.metrics.rule_match("(handoff)");
                let view = state.conversation(&account, &msg.from);
                self.events
                    .message_received(None, name, &msg, view.as_ref(), None);
                return;
            }
            Outcome::Consumed => return,
            Outcome::NoMatch => {
                self.metrics.rule_match("(none)");
                return;
            }
            Outcome::Rule(plan) => plan,
        };
        self.metrics.rule_match(&plan.rule);
        tracing::info!(rule = %plan.rule, "rule matched");
        if let Some(s) = plan.set_state {
            state.set_state(account.id, &msg.from, s, now);
        }
        if !plan.set_vars.is_empty() {
            state.set_vars(account.id, &msg.from, plan.set_vars, now);
        }
        // `typing` marks read too: with sends, the first carries it (shown
        // right before it goes out); without, it is shown now.
        let mut typing = plan.typing.then(|| msg.wamid.clone());
        if typing.is_some() && plan.sends.iter().all(|s| s.is_err()) {
            self.mark_read(&account, &msg.wamid, true);
            typing = None;
        } else if plan.mark_read && !plan.typing {
            self.mark_read(&account, &msg.wamid, false);
        }
        let source = format!("rule:{}", plan.rule);
        for (slot, content) in plan.sends.into_iter().enumerate() {
            match content {
                Ok(content) => self.send(&reply_to, slot, content, &source, false, typing.take()),
                Err(e) => {
                    tracing::error!(rule = %plan.rule, error = %e, "rule message could not be rendered; not sent")
                }
            }
        }
        if plan.handoff {
            let until = now + self.handoff_ttl.as_millis() as i64;
            state.set_handoff(account.id, &msg.from, Some(until), now);
        }
        if !plan.forward.is_empty() {
            // After state, vars and handoff are applied: the event shows them.
            let view = state.conversation(&account, &msg.from);
            self.events.message_received(
                Some(&plan.forward),
                name,
                &msg,
                view.as_ref(),
                Some(&plan.rule),
            );
        }
    }

    /// Queue reply number `slot` to `msg`. Its id is derived from the
    /// inbound message, so rules run again after a crash cannot send it
    /// twice.
    fn send(
        &self,
        reply_to: &ReplyTo<'_>,
        slot: usize,
        content: Content,
        source: &str,
        bypass_consent: bool,
        typing: Option<Wamid>,
    ) {
        let ReplyTo {
            account,
            msg,
            replayed,
        } = *reply_to;
        let id = MessageId::derived(
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
            validity: self.validity,
            bypass_consent,
            keep_refused: true,
            // Its rules may have run before: after a restart, or for a
            // message older than this process (Meta redelivering what an
            // earlier process received).
            may_exist: replayed || msg.timestamp < self.outbox.started_at(),
            typing,
        };
        if let Err((refused, id)) = enqueue(&self.outbox, new, now_ms()) {
            tracing::info!(reason = refused.code(), message_id = ?id, "rule message refused by policy");
        }
    }

    fn mark_read(&self, account: &Account, wamid: &str, typing: bool) {
        let Some(token) = account.settings.access_token.clone() else {
            return;
        };
        let graph = self.graph.clone();
        let pnid = account.settings.phone_number_id.clone();
        let wamid = wamid.to_string();
        // Lane workers run on the runtime; the call does not hold the lane.
        tokio::spawn(async move {
            if let Err(e) = graph.mark_read(&pnid, &token, &wamid, typing).await {
                tracing::warn!(error = %e.describe(), typing, "mark as read failed");
            }
        });
    }
}
