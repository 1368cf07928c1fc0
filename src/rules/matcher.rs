//! Finding the first rule whose `when` holds (SPEC §5).
//!
//! Exact `text`, `button` and `list` conditions are indexed in hash maps, so
//! a message only checks the rules it could match plus the rules that have
//! no indexable condition: 10,000 keyword rules route as fast as 10.

use std::collections::HashMap;

use regex::Regex;

use crate::domain::normalize_text;
use crate::inbound::InboundMessage;

/// A button or list id pattern: exact, or a prefix (written with a trailing `*`).
#[derive(Debug, Clone)]
pub enum IdPattern {
    Exact(String),
    Prefix(String),
}

impl IdPattern {
    pub fn parse(s: &str) -> Self {
        match s.strip_suffix('*') {
            Some(prefix) => IdPattern::Prefix(prefix.to_string()),
            None => IdPattern::Exact(s.to_string()),
        }
    }
    fn matches(&self, id: &str) -> bool {
        match self {
            IdPattern::Exact(e) => e == id,
            IdPattern::Prefix(p) => id.starts_with(p.as_str()),
        }
    }
}

/// The compiled `when` of one rule; `None` = not given.
#[derive(Debug, Default)]
pub struct Condition {
    pub account: Option<Vec<String>>,
    /// Digits only.
    pub from: Option<Vec<String>>,
    /// Bit set of `InboundKind::bit`.
    pub kinds: Option<u16>,
    /// Normalized (see `normalize_text`).
    pub text: Option<Vec<String>>,
    /// Lower-cased.
    pub contains: Option<Vec<String>>,
    pub regex: Option<Vec<Regex>>,
    pub button: Option<Vec<IdPattern>>,
    pub list: Option<Vec<IdPattern>>,
    pub state: Option<Vec<String>>,
    pub new_conversation: Option<bool>,
    /// Lower-cased.
    pub reply_to_tag: Option<Vec<String>>,
}

/// What a message brings to matching besides itself.
pub struct Facts<'a> {
    pub account: &'a str,
    pub state: &'a str,
    pub new_conversation: bool,
    /// Tags of the outbound message this one replies to.
    pub reply_tags: &'a [String],
}

/// A message prepared once for matching against many rules.
pub struct Prepared<'a> {
    msg: &'a InboundMessage,
    facts: Facts<'a>,
    norm: Option<String>,
    lower: Option<String>,
}

impl<'a> Prepared<'a> {
    pub fn new(msg: &'a InboundMessage, facts: Facts<'a>) -> Self {
        Prepared {
            norm: msg.text.as_deref().map(normalize_text),
            lower: msg.text.as_deref().map(str::to_lowercase),
            msg,
            facts,
        }
    }
}

impl Condition {
    /// Whether every given key holds; named regex groups go into `captures`.
    fn holds(&self, p: &Prepared<'_>, captures: &mut Vec<(String, String)>) -> bool {
        let m = p.msg;
        if let Some(accounts) = &self.account
            && !accounts.iter().any(|a| a == p.facts.account)
        {
            return false;
        }
        if let Some(from) = &self.from
            && !from.iter().any(|f| m.from == *f)
        {
            return false;
        }
        if let Some(kinds) = self.kinds
            && kinds & m.kind.bit() == 0
        {
            return false;
        }
        if let Some(texts) = &self.text {
            match &p.norm {
                Some(n) if texts.iter().any(|t| t == n) => {}
                _ => return false,
            }
        }
        if let Some(needles) = &self.contains {
            match &p.lower {
                Some(l) if needles.iter().any(|n| l.contains(n.as_str())) => {}
                _ => return false,
            }
        }
        if let Some(states) = &self.state
            && !states.iter().any(|s| s == p.facts.state)
        {
            return false;
        }
        if let Some(wanted) = self.new_conversation
            && wanted != p.facts.new_conversation
        {
            return false;
        }
        if let Some(tags) = &self.reply_to_tag
            && !tags.iter().any(|t| p.facts.reply_tags.contains(t))
        {
            return false;
        }
        for (patterns, kind) in [
            (&self.button, crate::inbound::InboundKind::Button),
            (&self.list, crate::inbound::InboundKind::List),
        ] {
            if let Some(patterns) = patterns {
                match &m.reply {
                    Some(r) if m.kind == kind && patterns.iter().any(|pat| pat.matches(&r.id)) => {}
                    _ => return false,
                }
            }
        }
        if let Some(regexes) = &self.regex {
            let Some(text) = m.text.as_deref() else {
                return false;
            };
            let Some(found) = regexes
                .iter()
                .find_map(|r| r.captures(text).map(|c| (r, c)))
            else {
                return false;
            };
            let (re, caps) = found;
            captures.clear();
            for name in re.capture_names().flatten() {
                if let Some(v) = caps.name(name) {
                    captures.push((name.to_string(), v.as_str().to_string()));
                }
            }
        }
        true
    }
}

/// The rules' conditions with their indexes.
#[derive(Debug, Default)]
pub struct Matcher {
    conditions: Vec<Condition>,
    by_text: HashMap<String, Vec<u32>>,
    by_button: HashMap<String, Vec<u32>>,
    by_list: HashMap<String, Vec<u32>>,
    /// Rules no index covers, in file order.
    unindexed: Vec<u32>,
}

/// The first matching rule and its regex captures.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub rule: usize,
    pub captures: Vec<(String, String)>,
}

fn all_exact(patterns: &Option<Vec<IdPattern>>) -> Option<Vec<&str>> {
    let patterns = patterns.as_ref()?;
    patterns
        .iter()
        .map(|p| match p {
            IdPattern::Exact(e) => Some(e.as_str()),
            IdPattern::Prefix(_) => None,
        })
        .collect()
}

impl Matcher {
    /// Index `conditions` (one per rule, in file order).
    pub fn new(conditions: Vec<Condition>) -> Self {
        let mut m = Matcher::default();
        for (i, c) in conditions.iter().enumerate() {
            let i = i as u32;
            if let Some(texts) = &c.text {
                for t in texts {
                    m.by_text.entry(t.clone()).or_default().push(i);
                }
            } else if let Some(ids) = all_exact(&c.button) {
                for id in ids {
                    m.by_button.entry(id.to_string()).or_default().push(i);
                }
            } else if let Some(ids) = all_exact(&c.list) {
                for id in ids {
                    m.by_list.entry(id.to_string()).or_default().push(i);
                }
            } else {
                m.unindexed.push(i);
            }
        }
        m.conditions = conditions;
        m
    }

    pub fn len(&self) -> usize {
        self.conditions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conditions.is_empty()
    }

    /// The first rule (in file order) whose condition holds.
    pub fn first_match(&self, p: &Prepared<'_>) -> Option<Hit> {
        let m = p.msg;
        let mut candidates: Vec<u32> = Vec::with_capacity(self.unindexed.len() + 4);
        candidates.extend_from_slice(&self.unindexed);
        let mut extend = |found: Option<&Vec<u32>>| {
            if let Some(found) = found {
                candidates.extend_from_slice(found);
            }
        };
        if let Some(norm) = &p.norm {
            extend(self.by_text.get(norm));
        }
        if let Some(reply) = &m.reply {
            match m.kind {
                crate::inbound::InboundKind::Button => extend(self.by_button.get(&reply.id)),
                crate::inbound::InboundKind::List => extend(self.by_list.get(&reply.id)),
                _ => {}
            }
        }
        candidates.sort_unstable();
        candidates.dedup();
        let mut captures = Vec::new();
        for i in candidates {
            if self.conditions[i as usize].holds(p, &mut captures) {
                return Some(Hit {
                    rule: i as usize,
                    captures,
                });
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbound::InboundKind;
    use crate::rules::Ruleset;

    fn rules(src: &str) -> Ruleset {
        crate::rules::compile::compile("t.toml", src, &[]).expect("compiles")
    }

    fn facts<'a>(state: &'a str, new_conversation: bool, tags: &'a [String]) -> Facts<'a> {
        Facts {
            account: "main",
            state,
            new_conversation,
            reply_tags: tags,
        }
    }

    fn rule_of(rs: &Ruleset, msg: &InboundMessage, f: Facts<'_>) -> Option<String> {
        rs.first_match(msg, f)
            .map(|h| rs.rules[h.rule].name.clone())
    }

    const FILE: &str = r#"
[[rule]]
name = "order"
when = { regex = '^order (?P<number>\d+)$' }

[[rule]]
name = "menu-in-state"
when = { text = "menu", state = "ordering" }

[[rule]]
name = "menu"
when = { text = ["menu", "hi there"] }

[[rule]]
name = "coffee"
when = { list = "coffee_*" }

[[rule]]
name = "yes"
when = { button = "yes" }

[[rule]]
name = "welcome"
when = { new_conversation = true }

[[rule]]
name = "survey-answer"
when = { reply_to_tag = "survey" }

[[rule]]
name = "fallback"
when = { type = "text" }
"#;

    #[test]
    fn text_is_compared_normalized_and_file_order_wins_across_indexes() {
        let rs = rules(FILE);
        let msg = |t: &str| InboundMessage::test_text("w", "1", t, 0);
        assert_eq!(
            rule_of(&rs, &msg("  MENU "), facts("", false, &[])).as_deref(),
            Some("menu")
        );
        assert_eq!(
            rule_of(&rs, &msg("Hi   there"), facts("", false, &[])).as_deref(),
            Some("menu")
        );
        // An indexed rule that comes first in the file beats a later one.
        assert_eq!(
            rule_of(&rs, &msg("menu"), facts("ordering", false, &[])).as_deref(),
            Some("menu-in-state")
        );
        assert_eq!(
            rule_of(&rs, &msg("menus"), facts("", false, &[])).as_deref(),
            Some("fallback")
        );
    }

    #[test]
    fn regex_captures_named_groups() {
        let rs = rules(FILE);
        let hit = rs
            .first_match(
                &InboundMessage::test_text("w", "1", "order 48213", 0),
                facts("", false, &[]),
            )
            .expect("a match");
        assert_eq!(rs.rules[hit.rule].name, "order");
        assert_eq!(
            hit.captures,
            vec![("number".to_string(), "48213".to_string())]
        );
    }

    #[test]
    fn button_and_list_ids_match_by_kind_exact_or_prefix() {
        let rs = rules(FILE);
        let f = || facts("", false, &[]);
        let list = InboundMessage::test_reply(InboundKind::List, "coffee_latte", "Latte");
        assert_eq!(rule_of(&rs, &list, f()).as_deref(), Some("coffee"));
        let button = InboundMessage::test_reply(InboundKind::Button, "yes", "Yes");
        assert_eq!(rule_of(&rs, &button, f()).as_deref(), Some("yes"));
        // A list reply with the button's id is not a button answer.
        let wrong = InboundMessage::test_reply(InboundKind::List, "yes", "Yes");
        assert_eq!(rule_of(&rs, &wrong, f()), None);
    }

    #[test]
    fn conversation_facts_take_part() {
        let rs = rules(FILE);
        let image = InboundMessage {
            kind: InboundKind::Image,
            text: None,
            ..InboundMessage::test_text("w", "1", "", 0)
        };
        assert_eq!(rule_of(&rs, &image, facts("", false, &[])), None);
        assert_eq!(
            rule_of(&rs, &image, facts("", true, &[])).as_deref(),
            Some("welcome")
        );
        let tags = vec!["survey".to_string()];
        assert_eq!(
            rule_of(&rs, &image, facts("", false, &tags)).as_deref(),
            Some("survey-answer")
        );
    }
}
