//! `routes.toml` text → [`Ruleset`]: every check of SPEC §5 happens here,
//! and every error carries `FILE:LINE:COL` and the rule's name.

use std::collections::HashSet;

use serde::Deserialize;
use serde::de::IntoDeserializer;
use serde_json::{Value, json};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::matcher::{Condition, IdPattern, Matcher};
use super::model::{ConsentIn, RoutesFile, RuleIn, SendIn, WhenIn};
use super::render::{Templates, Text, is_template};
use super::{Consent, Rule, Ruleset, SendObject, SendTemplate};
use crate::domain::{Located, normalize_text, parse_phone};
use crate::inbound::InboundKind;
use crate::message::MessageType;
use crate::message::validate::validate;

/// Compile the text of a rule file. `targets` are the event targets the
/// configuration defines (`forward` may only name these).
pub fn compile(file: &str, source: &str, targets: &[String]) -> Result<Ruleset, Vec<Located>> {
    let (parsed, shape_errors) = parse(file, source)?;
    let mut c = Compiler {
        file,
        source,
        targets,
        errors: Vec::new(),
        templates: Templates::default(),
    };
    let consent = c.consent(&parsed);
    let mut rules = Vec::new();
    let mut conditions = Vec::new();
    let mut names = HashSet::new();
    for spanned in &parsed.rule {
        let rule = spanned.get_ref();
        let name = rule.name.get_ref().clone();
        if name.trim().is_empty() {
            c.error(
                rule.name.span().start,
                "rule name must not be empty".to_string(),
            );
        } else if !names.insert(name.clone()) {
            c.error(
                rule.name.span().start,
                format!("rule {name:?}: another rule has this name"),
            );
        }
        conditions.push(c.condition(&name, rule.when.as_ref()));
        rules.push(c.rule(&name, rule));
    }
    if !shape_errors.is_empty() || !c.errors.is_empty() {
        let mut errors = shape_errors;
        errors.append(&mut c.errors);
        errors.sort_by_key(|e| (e.line, e.col));
        return Err(errors);
    }
    let uses_reply_tags = conditions.iter().any(|c| c.reply_to_tag.is_some());
    Ok(Ruleset {
        rules,
        matcher: Matcher::new(conditions),
        consent,
        templates: c.templates,
        uses_reply_tags,
    })
}

/// The file's shape, rule by rule: a syntax error stops here (all of them
/// are reported); a rule of the wrong shape (unknown key, wrong type) is
/// reported and left out, and the others are still parsed, so that `check`
/// names every broken rule in one run.
fn parse(file: &str, source: &str) -> Result<(RoutesFile, Vec<Located>), Vec<Located>> {
    let located = |offset: usize, message: String| Located::at(file, source, offset, message);
    let from = |e: &toml::de::Error, at: usize, prefix: String| {
        let offset = e.span().map_or(at, |s| s.start);
        located(offset, format!("{prefix}{}", e.message().trim_end()))
    };
    let (root, syntax) = DeTable::parse_recoverable(source);
    if !syntax.is_empty() {
        return Err(syntax.iter().map(|e| from(e, 0, String::new())).collect());
    }
    let mut out = RoutesFile::default();
    let mut errors = Vec::new();
    for (key, value) in root.into_inner() {
        let at = value.span().start;
        match key.get_ref().as_ref() {
            "consent" => match Spanned::<ConsentIn>::deserialize(value.into_deserializer()) {
                Ok(c) => out.consent = Some(c),
                Err(e) => errors.push(from(&e, at, "consent: ".into())),
            },
            "rule" => match value.into_inner() {
                DeValue::Array(items) => {
                    for item in items.iter() {
                        let at = item.span().start;
                        let name = match item.get_ref() {
                            DeValue::Table(t) => t.get("name").and_then(|n| match n.get_ref() {
                                DeValue::String(s) => Some(s.to_string()),
                                _ => None,
                            }),
                            _ => None,
                        };
                        let prefix = name.map_or("rule: ".into(), |n| format!("rule {n:?}: "));
                        match Spanned::<RuleIn>::deserialize(item.clone().into_deserializer()) {
                            Ok(rule) => out.rule.push(rule),
                            Err(e) => errors.push(from(&e, at, prefix)),
                        }
                    }
                }
                _ => errors.push(located(
                    at,
                    "`rule` must be an array of tables ([[rule]])".into(),
                )),
            },
            other => errors.push(located(
                key.span().start,
                format!("unknown key `{other}`, expected `consent` or `rule`"),
            )),
        }
    }
    Ok((out, errors))
}

struct Compiler<'a> {
    file: &'a str,
    source: &'a str,
    targets: &'a [String],
    errors: Vec<Located>,
    templates: Templates,
}

impl Compiler<'_> {
    fn error(&mut self, offset: usize, message: String) {
        self.errors
            .push(Located::at(self.file, self.source, offset, message));
    }

    fn text(&mut self, offset: usize, what: &str, source: &str) -> Text {
        match self.templates.add(source) {
            Ok(t) => t,
            Err(e) => {
                self.error(offset, format!("{what}: {e}"));
                Text::Literal(String::new())
            }
        }
    }

    fn consent(&mut self, file: &RoutesFile) -> Consent {
        let default_out = || vec!["stop".to_string(), "unsubscribe".to_string()];
        let Some(spanned) = &file.consent else {
            return Consent {
                opt_out: default_out(),
                opt_in: vec!["start".into()],
                opt_out_reply: None,
                opt_in_reply: None,
            };
        };
        let c = spanned.get_ref();
        let norm = |v: &Option<crate::domain::Strings>, d: Vec<String>| -> Vec<String> {
            v.as_ref().map_or(d, |s| {
                s.0.iter()
                    .map(|k| normalize_text(k))
                    .filter(|k| !k.is_empty())
                    .collect()
            })
        };
        let opt_out = norm(&c.opt_out, default_out());
        let opt_in = norm(&c.opt_in, vec!["start".into()]);
        if let Some(both) = opt_out.iter().find(|k| opt_in.contains(k)) {
            self.error(
                spanned.span().start,
                format!("consent: {both:?} is both an opt-out and an opt-in keyword"),
            );
        }
        let mut reply = |r: &Option<Spanned<String>>, what: &str| {
            r.as_ref().map(|r| {
                if r.get_ref().chars().count() > 4096 {
                    self.error(
                        r.span().start,
                        format!("consent: {what} is longer than 4096 characters"),
                    );
                }
                self.text(r.span().start, &format!("consent: {what}"), r.get_ref())
            })
        };
        let opt_out_reply = reply(&c.opt_out_reply, "opt_out_reply");
        let opt_in_reply = reply(&c.opt_in_reply, "opt_in_reply");
        Consent {
            opt_out,
            opt_in,
            opt_out_reply,
            opt_in_reply,
        }
    }

    fn condition(&mut self, rule: &str, when: Option<&Spanned<WhenIn>>) -> Condition {
        let Some(spanned) = when else {
            return Condition::default();
        };
        let w = spanned.get_ref();
        let at = spanned.span().start;
        let mut c = Condition {
            account: w.account.as_ref().map(|a| a.0.clone()),
            text: w
                .text
                .as_ref()
                .map(|t| t.0.iter().map(|s| normalize_text(s)).collect()),
            contains: w
                .contains
                .as_ref()
                .map(|t| t.0.iter().map(|s| s.to_lowercase()).collect()),
            button: w
                .button
                .as_ref()
                .map(|b| b.0.iter().map(|s| IdPattern::parse(s)).collect()),
            list: w
                .list
                .as_ref()
                .map(|b| b.0.iter().map(|s| IdPattern::parse(s)).collect()),
            state: w.state.as_ref().map(|s| s.0.clone()),
            new_conversation: w.new_conversation,
            reply_to_tag: w
                .reply_to_tag
                .as_ref()
                .map(|t| t.0.iter().map(|s| s.to_lowercase()).collect()),
            ..Condition::default()
        };
        for (key, list) in [
            ("account", w.account.as_ref().map(|s| &s.0)),
            ("text", w.text.as_ref().map(|s| &s.0)),
            ("contains", w.contains.as_ref().map(|s| &s.0)),
            ("button", w.button.as_ref().map(|s| &s.0)),
            ("list", w.list.as_ref().map(|s| &s.0)),
            ("reply_to_tag", w.reply_to_tag.as_ref().map(|s| &s.0)),
        ] {
            if let Some(list) = list
                && (list.is_empty() || list.iter().any(|s| s.trim().is_empty()))
            {
                self.error(
                    at,
                    format!("rule {rule:?}: when.{key} needs at least one non-empty value"),
                );
            }
        }
        if let Some(from) = &w.from {
            let mut numbers = Vec::new();
            for f in &from.get_ref().0 {
                match parse_phone(f) {
                    Some(d) => numbers.push(d),
                    None => self.error(
                        from.span().start,
                        format!("rule {rule:?}: when.from: {f:?} is not an E.164 phone number"),
                    ),
                }
            }
            c.from = Some(numbers);
        }
        if let Some(kinds) = &w.kind {
            let mut bits = 0u16;
            for k in &kinds.get_ref().0 {
                match InboundKind::parse(k) {
                    Some(kind) => bits |= kind.bit(),
                    None => {
                        let all: Vec<&str> = InboundKind::ALL.iter().map(|k| k.as_str()).collect();
                        self.error(
                            kinds.span().start,
                            format!(
                                "rule {rule:?}: when.type: unknown type {k:?}; use one of {}",
                                all.join(", ")
                            ),
                        );
                    }
                }
            }
            c.kinds = Some(bits);
        }
        if let Some(regexes) = &w.regex {
            let mut compiled = Vec::new();
            for r in &regexes.get_ref().0 {
                match regex::RegexBuilder::new(r).size_limit(1 << 20).build() {
                    Ok(re) => compiled.push(re),
                    Err(e) => {
                        let detail = e
                            .to_string()
                            .lines()
                            .last()
                            .unwrap_or_default()
                            .trim()
                            .to_string();
                        self.error(
                            regexes.span().start,
                            format!("rule {rule:?}: when.regex: invalid regex {r:?}: {detail}"),
                        );
                    }
                }
            }
            c.regex = Some(compiled);
        }
        c
    }

    fn rule(&mut self, name: &str, r: &RuleIn) -> Rule {
        let set_state = r.set_state.as_ref().map(|s| {
            self.text(
                s.span().start,
                &format!("rule {name:?}: set_state"),
                s.get_ref(),
            )
        });
        let mut set = Vec::new();
        for (var, value) in r.set.iter().flatten() {
            if var.is_empty() || !var.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                self.error(
                    value.span().start,
                    format!(
                        "rule {name:?}: set: variable name {var:?} must be letters, digits and _"
                    ),
                );
            }
            let t = self.text(
                value.span().start,
                &format!("rule {name:?}: set.{var}"),
                value.get_ref(),
            );
            set.push((var.clone(), t));
        }
        let mut forward = Vec::new();
        if let Some(f) = &r.forward {
            for target in &f.get_ref().0 {
                if !self.targets.contains(target) {
                    let known = if self.targets.is_empty() {
                        "none are configured".to_string()
                    } else {
                        format!("configured: {}", self.targets.join(", "))
                    };
                    self.error(
                        f.span().start,
                        format!("rule {name:?}: forward: unknown target {target:?} ({known})"),
                    );
                }
                forward.push(target.clone());
            }
        }
        let mut sends = Vec::new();
        for (i, s) in r.send.iter().enumerate() {
            if let Some(t) = self.send(name, i, s) {
                sends.push(t);
            }
        }
        Rule {
            name: name.to_string(),
            set_state,
            set,
            mark_read: r.mark_read,
            typing: r.typing,
            sends,
            forward,
            handoff: r.handoff,
        }
    }

    fn send(
        &mut self,
        rule: &str,
        index: usize,
        spanned: &Spanned<SendIn>,
    ) -> Option<SendTemplate> {
        let s = spanned.get_ref();
        let at = spanned.span().start;
        let what = format!("rule {rule:?}: send[{index}] ({})", s.kind);
        let object = match authoring_to_graph(s) {
            Ok(o) => o,
            Err(msg) => {
                self.error(at, format!("{what}: {msg}"));
                return None;
            }
        };
        if s.quote && s.kind == "reaction" {
            self.error(
                at,
                format!(
                    "{what}: a reaction cannot quote (WhatsApp does not allow contextual reactions)"
                ),
            );
        }
        let Some(kind) = MessageType::parse(graph_type(&s.kind)) else {
            self.error(at, format!("{what}: unknown message type"));
            return None;
        };
        // Validate with each template reduced to its static text plus one
        // character per expression: counts are exact, lengths a lower bound.
        let preview = map_strings(&object, &mut |s| {
            if is_template(s) {
                static_preview(s)
            } else {
                s.to_string()
            }
        });
        if let Err(invalid) = validate(kind.as_str(), &preview) {
            self.error(
                at,
                format!("{what}: {}: {}", invalid.field, invalid.message),
            );
        }
        let mut slots = Vec::new();
        let mut pointers = Vec::new();
        collect_templates(&object, String::new(), &mut pointers);
        for (pointer, source) in pointers {
            let text = self.text(at, &what, &source);
            slots.push((pointer, text));
        }
        Some(SendTemplate {
            kind,
            object: if slots.is_empty() {
                SendObject::Fixed(crate::message::Object::new(&object))
            } else {
                SendObject::Slotted(object)
            },
            slots,
            quote: s.quote,
        })
    }
}

fn graph_type(authoring: &str) -> &str {
    match authoring {
        "buttons" | "list" | "cta_url" => "interactive",
        other => other,
    }
}

/// Replace each `{{ … }}` / `{% … %}` with one `x`.
fn static_preview(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find(['{']) {
        let (head, tail) = rest.split_at(start);
        out.push_str(head);
        let close = match tail.get(..2) {
            Some("{{") => "}}",
            Some("{%") => "%}",
            Some("{#") => "#}",
            _ => {
                out.push('{');
                rest = &tail[1..];
                continue;
            }
        };
        match tail.find(close) {
            Some(end) => {
                if close == "}}" {
                    out.push('x');
                }
                rest = &tail[end + 2..];
            }
            None => {
                out.push_str(tail);
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

fn map_strings(v: &Value, f: &mut impl FnMut(&str) -> String) -> Value {
    match v {
        Value::String(s) => Value::String(f(s)),
        Value::Array(a) => Value::Array(a.iter().map(|x| map_strings(x, f)).collect()),
        Value::Object(o) => Value::Object(
            o.iter()
                .map(|(k, x)| (k.clone(), map_strings(x, f)))
                .collect(),
        ),
        other => other.clone(),
    }
}

fn collect_templates(v: &Value, pointer: String, out: &mut Vec<(String, String)>) {
    match v {
        Value::String(s) if is_template(s) => out.push((pointer, s.clone())),
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                collect_templates(x, format!("{pointer}/{i}"), out);
            }
        }
        Value::Object(o) => {
            for (k, x) in o {
                let key = k.replace('~', "~0").replace('/', "~1");
                collect_templates(x, format!("{pointer}/{key}"), out);
            }
        }
        _ => {}
    }
}

/// The keys each authoring type allows (SPEC §5 send table).
fn allowed_keys(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "text" => &["body", "preview_url"],
        "image" | "video" => &["link", "media_id", "caption"],
        "document" => &["link", "media_id", "caption", "filename"],
        "audio" | "sticker" => &["link", "media_id"],
        "location" => &["latitude", "longitude", "name", "address"],
        "buttons" => &["body", "header", "footer", "buttons"],
        "list" => &["body", "header", "footer", "button", "sections"],
        "cta_url" => &["body", "display_text", "url", "header", "footer"],
        "template" => &["name", "language", "body_params", "components"],
        "reaction" => &["emoji"],
        _ => return None,
    })
}

/// Compile an authoring-shape send entry into Meta's message object.
fn authoring_to_graph(s: &SendIn) -> Result<Value, String> {
    let allowed = allowed_keys(&s.kind).ok_or_else(|| {
        "unknown send type; use text, image, video, audio, document, sticker, location, buttons, list, cta_url, template or reaction".to_string()
    })?;
    if let Some(extra) = s.keys().into_iter().find(|k| !allowed.contains(k)) {
        return Err(format!(
            "key `{extra}` is not allowed here (allowed: {})",
            allowed.join(", ")
        ));
    }
    let req =
        |v: &Option<String>, key: &str| v.clone().ok_or_else(|| format!("`{key}` is required"));
    let interactive_frame = |kind: &str, action: Value| -> Result<Value, String> {
        let mut o =
            json!({ "type": kind, "body": { "text": req(&s.body, "body")? }, "action": action });
        if let Some(h) = &s.header {
            o["header"] = json!({ "type": "text", "text": h });
        }
        if let Some(f) = &s.footer {
            o["footer"] = json!({ "text": f });
        }
        Ok(o)
    };
    Ok(match s.kind.as_str() {
        "text" => {
            let mut o = json!({ "body": req(&s.body, "body")? });
            if let Some(p) = s.preview_url {
                o["preview_url"] = json!(p);
            }
            o
        }
        "image" | "video" | "audio" | "document" | "sticker" => {
            let mut o = match (&s.link, &s.media_id) {
                (Some(link), None) => json!({ "link": link }),
                (None, Some(id)) => json!({ "id": id }),
                _ => return Err("give exactly one of `link` and `media_id`".into()),
            };
            if let Some(c) = &s.caption {
                o["caption"] = json!(c);
            }
            if let Some(f) = &s.filename {
                o["filename"] = json!(f);
            }
            o
        }
        "location" => {
            let (Some(lat), Some(lon)) = (s.latitude, s.longitude) else {
                return Err("`latitude` and `longitude` are required".into());
            };
            let mut o = json!({ "latitude": lat, "longitude": lon });
            if let Some(n) = &s.name {
                o["name"] = json!(n);
            }
            if let Some(a) = &s.address {
                o["address"] = json!(a);
            }
            o
        }
        "buttons" => {
            let buttons = s.buttons.as_ref().ok_or("`buttons` is required")?;
            let list: Vec<Value> = buttons
                .iter()
                .map(|b| json!({ "type": "reply", "reply": { "id": b.id, "title": b.title } }))
                .collect();
            interactive_frame("button", json!({ "buttons": list }))?
        }
        "list" => {
            let sections = s.sections.as_ref().ok_or("`sections` is required")?;
            let list: Vec<Value> = sections
                .iter()
                .map(|sec| {
                    let rows: Vec<Value> = sec
                        .rows
                        .iter()
                        .map(|r| {
                            let mut row = json!({ "id": r.id, "title": r.title });
                            if let Some(d) = &r.description {
                                row["description"] = json!(d);
                            }
                            row
                        })
                        .collect();
                    let mut o = json!({ "rows": rows });
                    if let Some(t) = &sec.title {
                        o["title"] = json!(t);
                    }
                    o
                })
                .collect();
            interactive_frame(
                "list",
                json!({ "button": req(&s.button, "button")?, "sections": list }),
            )?
        }
        "cta_url" => interactive_frame(
            "cta_url",
            json!({ "name": "cta_url", "parameters": { "display_text": req(&s.display_text, "display_text")?, "url": req(&s.url, "url")? } }),
        )?,
        "template" => {
            let mut o = json!({ "name": req(&s.name, "name")?, "language": { "code": req(&s.language, "language")? } });
            match (&s.body_params, &s.components) {
                (Some(_), Some(_)) => {
                    return Err("give either `body_params` or `components`, not both".into());
                }
                (Some(params), None) => {
                    let p: Vec<Value> = params
                        .iter()
                        .map(|t| json!({ "type": "text", "text": t }))
                        .collect();
                    o["components"] = json!([{ "type": "body", "parameters": p }]);
                }
                (None, Some(c)) => o["components"] = c.clone(),
                (None, None) => {}
            }
            o
        }
        "reaction" => json!({ "message_id": "{{ message.id }}", "emoji": req(&s.emoji, "emoji")? }),
        _ => unreachable!("allowed_keys covers every type"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(src: &str) -> Vec<String> {
        compile("routes.toml", src, &["agents".into()])
            .err()
            .unwrap_or_default()
            .iter()
            .map(|e| e.to_string())
            .collect()
    }

    #[test]
    fn valid_file_compiles() {
        let rs = compile(
            "routes.toml",
            r#"
[[rule]]
name = "greet"
when = { text = ["hi", "Hello"] }
set_state = "menu"
[[rule.send]]
type = "buttons"
body = "Hi {{ contact.name }}!"
buttons = [ { id = "sales", title = "Talk to sales" } ]
"#,
            &[],
        )
        .unwrap();
        assert_eq!(rs.rules.len(), 1);
        assert_eq!(rs.rules[0].sends[0].kind, MessageType::Interactive);
        assert_eq!(rs.rules[0].sends[0].slots.len(), 1);
    }

    #[test]
    fn bad_regex_names_rule_and_line() {
        let e = errors("[[rule]]\nname = \"broken\"\nwhen = { regex = '^order (?P<n>\\d+' }\n");
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("routes.toml:3:"), "{}", e[0]);
        assert!(e[0].contains("\"broken\""), "{}", e[0]);
    }

    #[test]
    fn unknown_key_names_rule() {
        let e = errors(
            "[[rule]]\nname = \"a\"\nsend = []\n\n[[rule]]\nname = \"second\"\nwhn = { text = \"x\" }\n",
        );
        assert!(e[0].starts_with("routes.toml:7:1:"), "{}", e[0]);
        assert!(e[0].contains("rule \"second\""), "{}", e[0]);
        assert!(e[0].contains("whn"), "{}", e[0]);
    }

    #[test]
    fn whatsapp_limits_are_checked_at_load() {
        let e = errors(
            "[[rule]]\nname = \"many\"\n[[rule.send]]\ntype = \"buttons\"\nbody = \"b\"\nbuttons = [{id=\"1\",title=\"a\"},{id=\"2\",title=\"b\"},{id=\"3\",title=\"c\"},{id=\"4\",title=\"d\"}]\n",
        );
        assert!(e[0].starts_with("routes.toml:3:"), "{}", e[0]);
        assert!(e[0].contains("interactive.action.buttons"), "{}", e[0]);
        let e = errors(
            "[[rule]]\nname = \"long\"\nsend = [{ type = \"buttons\", body = \"b\", buttons = [{ id = \"x\", title = \"{{ contact.name }} this title is far too long\" }] }]\n",
        );
        assert!(e[0].contains("title"), "{e:?}");
    }

    #[test]
    fn unknown_target_type_and_keys_are_errors() {
        let e = errors("[[rule]]\nname = \"f\"\nforward = \"crm\"\n");
        assert!(e[0].contains("unknown target \"crm\""), "{}", e[0]);
        let e = errors("[[rule]]\nname = \"t\"\nwhen = { type = \"gif\" }\n");
        assert!(e[0].contains("unknown type \"gif\""), "{}", e[0]);
        let e = errors(
            "[[rule]]\nname = \"c\"\nsend = [{ type = \"audio\", link = \"https://x.test/a.ogg\", caption = \"no\" }]\n",
        );
        assert!(e[0].contains("`caption` is not allowed"), "{}", e[0]);
        let e =
            errors("[[rule]]\nname = \"s\"\nsend = [{ type = \"text\", body = \"{{ oops\" }]\n");
        assert!(e[0].contains("template error"), "{}", e[0]);
    }

    #[test]
    fn every_error_is_reported() {
        let e = errors(
            "[[rule]]\nname = \"a\"\nwhen = { regex = '(' }\n[[rule]]\nname = \"a\"\nforward = \"nope\"\n",
        );
        assert_eq!(e.len(), 3, "{e:?}");
    }

    #[test]
    fn previews_keep_static_text() {
        assert_eq!(static_preview("Hi {{ contact.name }}!"), "Hi x!");
        assert_eq!(static_preview("{% if a %}yes{% endif %}"), "yes");
    }
}
