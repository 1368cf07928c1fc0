//! `rules::compile::compile` on any UTF-8 text: never panics, its errors
//! format, and a ruleset it accepts can run (consent check, first_match,
//! plan, consent reply) on a few synthetic messages without panicking.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;
use wa_router::inbound::{InboundKind, InboundMessage, ReplyChoice};
use wa_router::rules::Facts;
use wa_router::rules::compile::compile;

fn message(kind: InboundKind, text: Option<&str>, reply: Option<&str>) -> InboundMessage {
    InboundMessage {
        wamid: "wamid.HBgLMTYzMTU1NTExODEVAgASGBQzQTdCNUQ2RjE4QjY0OEM1QTlFNQA=".into(),
        from: "16315551181".into(),
        contact_name: Some("Ana Souza".into()),
        timestamp: 1_795_000_000_000,
        kind,
        raw_type: kind.as_str().into(),
        text: text.map(str::to_string),
        reply: reply.map(|id| ReplyChoice {
            id: id.into(),
            title: text.unwrap_or(id).into(),
        }),
        context_id: Some("wamid.context".into()),
        opens_window: true,
        raw: RawValue::from_string(r#"{"type":"text"}"#.into()).unwrap(),
    }
}

/// Up to `max` short string literals of the source, so that synthetic
/// messages can hit the rules it defines.
fn literals(source: &str, max: usize) -> Vec<&str> {
    let mut out = Vec::new();
    for (i, piece) in source.split('"').enumerate() {
        if i % 2 == 1 && piece.len() <= 64 && !piece.contains('\n') {
            out.push(piece);
            if out.len() == max {
                break;
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Ok(source) = std::str::from_utf8(data) else {
        return;
    };
    let targets = vec!["agents".to_string()];
    let rules = match compile("routes.toml", source, &targets) {
        Ok(rules) => rules,
        Err(errors) => {
            assert!(!errors.is_empty(), "Err with no error");
            for e in &errors {
                std::hint::black_box(e.to_string());
            }
            return;
        }
    };

    let lits = literals(source, 8);
    let mut messages = vec![
        message(InboundKind::Text, Some("hi"), None),
        message(InboundKind::Text, Some("  Order 48213 "), None),
        message(InboundKind::Text, Some("stop"), None),
        message(InboundKind::Text, Some(""), None),
        message(InboundKind::Button, Some("Show menu"), Some("show_menu")),
        message(InboundKind::List, Some("Latte"), Some("coffee_latte")),
        message(InboundKind::Image, Some("a caption"), None),
        message(InboundKind::Location, None, None),
        message(InboundKind::Unsupported, None, None),
    ];
    for lit in &lits {
        messages.push(message(InboundKind::Text, Some(lit), None));
        messages.push(message(InboundKind::Button, Some(lit), Some(lit)));
        messages.push(message(InboundKind::List, Some(lit), Some(lit)));
    }

    let tags: Vec<String> = lits.iter().take(2).map(|s| s.to_string()).collect();
    let states: Vec<&str> = ["", "menu"].into_iter().chain(lits.iter().copied().take(2)).collect();
    let mut vars = BTreeMap::new();
    vars.insert("name".to_string(), "Ana".to_string());

    for msg in &messages {
        if let Some(which) = rules.consent_keyword(msg) {
            std::hint::black_box(rules.consent_reply(which, msg, "main"));
        }
        for (i, state) in states.iter().enumerate() {
            let facts = Facts {
                account: if i % 2 == 0 { "main" } else { lits.first().copied().unwrap_or("other") },
                state,
                new_conversation: i % 2 == 1,
                reply_tags: if i == 0 { &[] } else { &tags },
            };
            if let Some(hit) = rules.first_match(msg, facts) {
                assert!(hit.rule < rules.len(), "hit {} of {} rules", hit.rule, rules.len());
                std::hint::black_box(rules.plan(&hit, msg, "main", state, &vars));
            }
        }
    }
});
