//! String templates of rule files: compiled once at load into one
//! minijinja environment per ruleset, rendered per inbound message.
//!
//! Strings without `{{`/`{%` never touch the template engine.

use std::collections::BTreeMap;

use minijinja::{Environment, UndefinedBehavior, Value};

use crate::inbound::InboundMessage;

/// A string of a rule file: literal, or the name of a compiled template.
#[derive(Debug, Clone)]
pub enum Text {
    Literal(String),
    Template(String),
}

/// All templates of one ruleset.
pub struct Templates {
    env: Environment<'static>,
    next: usize,
}

impl Default for Templates {
    fn default() -> Self {
        let mut env = Environment::new();
        // Missing values (an unknown contact name, an unset var) render empty.
        env.set_undefined_behavior(UndefinedBehavior::Chainable);
        Templates { env, next: 0 }
    }
}

impl std::fmt::Debug for Templates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Templates({})", self.next)
    }
}

/// Whether `s` contains template syntax.
pub fn is_template(s: &str) -> bool {
    s.contains("{{") || s.contains("{%") || s.contains("{#")
}

impl Templates {
    /// Compile `source`; a syntax error is returned as its message.
    pub fn add(&mut self, source: &str) -> Result<Text, String> {
        if !is_template(source) {
            return Ok(Text::Literal(source.to_string()));
        }
        let name = format!("t{}", self.next);
        self.next += 1;
        self.env
            .add_template_owned(name.clone(), source.to_string())
            .map_err(|e| template_error(&e))?;
        Ok(Text::Template(name))
    }

    /// Render `text` with `ctx` (built only if `text` is a template).
    pub fn render(&self, text: &Text, ctx: &Context<'_>) -> Result<String, String> {
        match text {
            Text::Literal(s) => Ok(s.clone()),
            Text::Template(name) => {
                let t = self
                    .env
                    .get_template(name)
                    .map_err(|e| template_error(&e))?;
                t.render(ctx.get()).map_err(|e| template_error(&e))
            }
        }
    }
}

/// A template context, built on first use: a rule whose strings are all
/// literal (most replies) builds none.
pub struct Context<'a> {
    make: &'a dyn Fn() -> Value,
    value: std::cell::OnceCell<Value>,
}

impl<'a> Context<'a> {
    pub fn new(make: &'a dyn Fn() -> Value) -> Self {
        Context {
            make,
            value: std::cell::OnceCell::new(),
        }
    }

    fn get(&self) -> &Value {
        self.value.get_or_init(self.make)
    }
}

fn template_error(e: &minijinja::Error) -> String {
    match e.detail() {
        Some(detail) => format!("template error: {detail}"),
        None => format!("template error: {}", e.kind()),
    }
}

/// Everything a template may name (SPEC §5).
pub struct RenderInput<'a> {
    pub message: &'a InboundMessage,
    pub account: &'a str,
    pub captures: &'a [(String, String)],
    pub state: &'a str,
    pub vars: &'a BTreeMap<String, String>,
}

/// The template context of one inbound message.
pub fn context(input: &RenderInput<'_>) -> Value {
    let m = input.message;
    let mut contact = BTreeMap::new();
    contact.insert(
        "name",
        Value::from(m.contact_name.clone().unwrap_or_default()),
    );
    contact.insert("wa_id", Value::from(m.from.as_str()));
    contact.insert(
        "user_id",
        Value::from(m.user_id.clone().unwrap_or_default()),
    );
    contact.insert(
        "username",
        Value::from(m.username.clone().unwrap_or_default()),
    );
    let mut message = BTreeMap::new();
    message.insert("id", Value::from(m.wamid.as_str()));
    message.insert("type", Value::from(m.kind.as_str()));
    message.insert("text", Value::from(m.text.clone().unwrap_or_default()));
    let mut reply = BTreeMap::new();
    if let Some(r) = &m.reply {
        reply.insert("id", Value::from(r.id.clone()));
        reply.insert("title", Value::from(r.title.clone()));
    }
    let captures: BTreeMap<&str, Value> = input
        .captures
        .iter()
        .map(|(k, v)| (k.as_str(), Value::from(v.clone())))
        .collect();
    let vars: BTreeMap<&str, Value> = input
        .vars
        .iter()
        .map(|(k, v)| (k.as_str(), Value::from(v.clone())))
        .collect();
    let mut account = BTreeMap::new();
    account.insert("name", Value::from(input.account));
    let mut root = BTreeMap::new();
    root.insert("contact", Value::from(contact));
    root.insert("message", Value::from(message));
    root.insert("reply", Value::from(reply));
    root.insert("match", Value::from(captures));
    root.insert("state", Value::from(input.state));
    root.insert("vars", Value::from(vars));
    root.insert("account", Value::from(account));
    Value::from(root)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbound::InboundKind;

    fn render(source: &str, input: &RenderInput<'_>) -> Result<String, String> {
        let mut t = Templates::default();
        let text = t.add(source)?;
        t.render(&text, &Context::new(&|| context(input)))
    }

    #[test]
    fn every_name_of_the_spec_renders_and_missing_ones_are_empty() {
        let msg = InboundMessage {
            contact_name: Some("Ana".into()),
            ..InboundMessage::test_reply(InboundKind::Button, "yes", "Yes please")
        };
        let vars = BTreeMap::from([("city".to_string(), "Lisbon".to_string())]);
        let captures = [("n".to_string(), "42".to_string())];
        let input = RenderInput {
            message: &msg,
            account: "main",
            captures: &captures,
            state: "menu",
            vars: &vars,
        };
        let out = render(
            "{{ contact.name }}|{{ contact.wa_id }}|{{ message.id }}|{{ message.type }}|{{ message.text }}|{{ reply.id }}|{{ reply.title }}|{{ match.n }}|{{ state }}|{{ vars.city }}|{{ account.name }}",
            &input,
        )
        .unwrap();
        assert_eq!(
            out,
            "Ana|15550001111|wamid.reply|button|Yes please|yes|Yes please|42|menu|Lisbon|main"
        );
        assert_eq!(
            render("[{{ vars.nope }}{{ match.x }}]", &input).unwrap(),
            "[]"
        );
    }

    #[test]
    fn literals_skip_the_engine_and_syntax_errors_are_reported() {
        let mut t = Templates::default();
        assert!(matches!(t.add("plain {text}").unwrap(), Text::Literal(_)));
        let err = t.add("{{ unclosed").unwrap_err();
        assert!(err.starts_with("template error"), "{err}");
    }
}
