//! The routing step as one pure function: what the rules decide for one
//! inbound message, given what is known of its conversation. Both the
//! router (`crate::routing`) and `wa-router simulate` call [`route`]; only
//! the caller touches state, queues or the network.

use std::collections::BTreeMap;

use super::{ConsentKeyword, Facts, Plan, Ruleset};
use crate::inbound::InboundMessage;
use crate::message::Content;

/// What the routing step knows of the conversation before the message.
#[derive(Debug, Clone, Copy)]
pub struct ConversationFacts<'a> {
    pub account: &'a str,
    pub state: &'a str,
    pub vars: &'a BTreeMap<String, String>,
    /// The message opened a new 24 h window.
    pub new_conversation: bool,
    /// A person has the conversation: no rules run.
    pub handed_off: bool,
    /// Tags of the outbound message this one replies to.
    pub reply_tags: &'a [String],
}

/// A consent keyword and its rendered reply (if the file sets one).
#[derive(Debug)]
pub struct ConsentDecision {
    pub keyword: ConsentKeyword,
    pub reply: Option<Result<Content, String>>,
}

/// What happens after consent.
#[derive(Debug)]
pub enum Outcome {
    /// Handed off: no rules; the message goes to every target.
    HandedOff,
    /// A consent keyword consumed the message: no rules.
    Consumed,
    /// No rule matched.
    NoMatch,
    /// A rule matched: apply its plan.
    Rule(Box<Plan>),
}

/// The routing decision for one message.
#[derive(Debug)]
pub struct Decision {
    /// Consent keywords count even while handed off (SPEC §4).
    pub consent: Option<ConsentDecision>,
    pub outcome: Outcome,
}

/// Decide what `rules` do with `msg` (SPEC §4–5): consent keywords first
/// (also while handed off), then nothing while handed off, else the first
/// matching rule's rendered plan.
pub fn route(rules: &Ruleset, msg: &InboundMessage, conv: ConversationFacts<'_>) -> Decision {
    let consent = rules.consent_keyword(msg).map(|keyword| ConsentDecision {
        keyword,
        reply: rules.consent_reply(keyword, msg, conv.account),
    });
    let outcome = if conv.handed_off {
        Outcome::HandedOff
    } else if consent.is_some() {
        Outcome::Consumed
    } else {
        let facts = Facts {
            account: conv.account,
            state: conv.state,
            new_conversation: conv.new_conversation,
            reply_tags: conv.reply_tags,
        };
        match rules.first_match(msg, facts) {
            None => Outcome::NoMatch,
            Some(hit) => Outcome::Rule(Box::new(rules.plan(
                &hit,
                msg,
                conv.account,
                conv.state,
                conv.vars,
            ))),
        }
    };
    Decision { consent, outcome }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbound::InboundMessage;

    fn rules(src: &str) -> Ruleset {
        super::super::compile::compile("t.toml", src, &[]).expect("compiles")
    }

    fn text(body: &str) -> InboundMessage {
        InboundMessage::test_text("wamid.1", "15550001111", body, 0)
    }

    fn facts<'a>(vars: &'a BTreeMap<String, String>, handed_off: bool) -> ConversationFacts<'a> {
        ConversationFacts {
            account: "main",
            state: "",
            vars,
            new_conversation: false,
            handed_off,
            reply_tags: &[],
        }
    }

    const FILE: &str = r#"
[consent]
opt_out_reply = "bye"

[[rule]]
name = "hi"
when = { text = ["hi"] }
set_state = "greeted"

[[rule.send]]
type = "text"
body = "hello {{ contact.name or 'there' }}"
"#;

    #[test]
    fn a_matching_rule_gives_its_rendered_plan() {
        let vars = BTreeMap::new();
        let d = route(&rules(FILE), &text("Hi"), facts(&vars, false));
        assert!(d.consent.is_none());
        let Outcome::Rule(plan) = d.outcome else {
            panic!("expected a rule, got {:?}", d.outcome)
        };
        assert_eq!(plan.rule, "hi");
        assert_eq!(plan.set_state.as_deref(), Some("greeted"));
        let content = plan.sends[0].as_ref().expect("rendered");
        assert_eq!(content.object.to_value()["body"], "hello there");
    }

    #[test]
    fn handed_off_runs_no_rule_but_still_honours_consent() {
        let vars = BTreeMap::new();
        let rules = rules(FILE);
        let d = route(&rules, &text("hi"), facts(&vars, true));
        assert!(matches!(d.outcome, Outcome::HandedOff));
        let d = route(&rules, &text("STOP"), facts(&vars, true));
        assert!(matches!(d.outcome, Outcome::HandedOff));
        let consent = d.consent.expect("a keyword");
        assert_eq!(consent.keyword, ConsentKeyword::OptOut);
        assert_eq!(
            consent
                .reply
                .expect("a reply")
                .expect("rendered")
                .object
                .to_value()["body"],
            "bye"
        );
    }

    #[test]
    fn a_consent_keyword_consumes_the_message() {
        let vars = BTreeMap::new();
        let d = route(&rules(FILE), &text("start"), facts(&vars, false));
        assert!(matches!(d.outcome, Outcome::Consumed));
        let consent = d.consent.expect("a keyword");
        assert_eq!(consent.keyword, ConsentKeyword::OptIn);
        assert!(consent.reply.is_none(), "no opt_in_reply in the file");
    }

    #[test]
    fn no_rule_no_plan() {
        let vars = BTreeMap::new();
        let d = route(&rules(FILE), &text("what?"), facts(&vars, false));
        assert!(matches!(d.outcome, Outcome::NoMatch));
    }
}
