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
    /// What the templates name, for [`Templates::context`].
    needs: Needs,
}

impl Default for Templates {
    fn default() -> Self {
        let mut env = Environment::new();
        // Missing values (an unknown contact name, an unset var) render empty.
        env.set_undefined_behavior(UndefinedBehavior::Chainable);
        Templates {
            env,
            next: 0,
            needs: Needs::default(),
        }
    }
}

/// The names the templates of a ruleset use, as minijinja reports them
/// (`contact.name`; `vars` alone when a template walks or indexes the
/// whole group): a context holds those only (perf: building all of it
/// for every reply was 2.3 % of the router's CPU on a template reply).
#[derive(Debug, Default)]
struct Needs(std::collections::HashSet<String>);

impl Needs {
    /// The group itself (`vars`, `state`) is named.
    fn whole(&self, group: &str) -> bool {
        self.0.contains(group)
    }

    /// `group.field` is named, or the whole group.
    fn field(&self, group: &str, field: &str) -> bool {
        self.whole(group)
            || self.0.iter().any(|n| {
                n.strip_prefix(group)
                    .and_then(|rest| rest.strip_prefix('.'))
                    .and_then(|rest| rest.strip_prefix(field))
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
            })
    }

    /// Anything under `group` is named.
    fn any(&self, group: &str) -> bool {
        self.0.iter().any(|n| {
            n.strip_prefix(group)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
        })
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
        let t = self
            .env
            .get_template(&name)
            .map_err(|e| template_error(&e))?;
        self.needs.0.extend(t.undeclared_variables(true));
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

impl Templates {
    /// The template context of one inbound message: what the templates
    /// name of it (SPEC §5), no more.
    pub fn context(&self, input: &RenderInput<'_>) -> Value {
        let need = &self.needs;
        let m = input.message;
        let mut root = BTreeMap::new();
        // A group, with the fields of it the templates name.
        let mut group = |name: &'static str, pairs: &mut dyn Iterator<Item = (&str, &str)>| {
            if need.any(name) {
                let map: BTreeMap<&str, Value> = pairs
                    .filter(|(k, _)| need.field(name, k))
                    .map(|(k, v)| (k, Value::from(v)))
                    .collect();
                root.insert(name, Value::from(map));
            }
        };
        fn text(v: &Option<String>) -> &str {
            v.as_deref().unwrap_or_default()
        }
        group(
            "contact",
            &mut [
                ("name", text(&m.contact_name)),
                ("wa_id", m.from.as_str()),
                ("user_id", text(&m.user_id)),
                ("username", text(&m.username)),
            ]
            .into_iter(),
        );
        group(
            "message",
            &mut [
                ("id", m.wamid.as_str()),
                ("type", m.kind.as_str()),
                ("text", text(&m.text)),
            ]
            .into_iter(),
        );
        // `reply` is empty unless the message answers a button or a list.
        group(
            "reply",
            &mut m
                .reply
                .iter()
                .flat_map(|r| [("id", r.id.as_str()), ("title", r.title.as_str())]),
        );
        group("account", &mut std::iter::once(("name", input.account)));
        // Names the rule file chose (captures, variables).
        group(
            "match",
            &mut input.captures.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        );
        group(
            "vars",
            &mut input.vars.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        );
        if need.any("state") {
            root.insert("state", Value::from(input.state));
        }
        Value::from(root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbound::InboundKind;

    fn render(source: &str, input: &RenderInput<'_>) -> Result<String, String> {
        let mut t = Templates::default();
        let text = t.add(source)?;
        t.render(&text, &Context::new(&|| t.context(input)))
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
    fn a_context_holds_what_the_templates_name_and_all_of_it() {
        let msg = InboundMessage {
            contact_name: Some("Ana".into()),
            ..InboundMessage::test_reply(InboundKind::Button, "yes", "Yes please")
        };
        let vars = BTreeMap::from([
            ("city".to_string(), "Lisbon".to_string()),
            ("zip".to_string(), "1000".to_string()),
        ]);
        let input = RenderInput {
            message: &msg,
            account: "main",
            captures: &[],
            state: "menu",
            vars: &vars,
        };
        let mut t = Templates::default();
        let greet = t.add("Hi {{ contact.name }}").unwrap();
        let walk = t
            .add("{% for k, v in vars|items %}{{ k }}={{ v }};{% endfor %}")
            .unwrap();
        let make = || t.context(&input);
        let ctx = Context::new(&make);
        assert_eq!(t.render(&greet, &ctx).unwrap(), "Hi Ana");
        // A template that walks a group gets all of it.
        assert_eq!(t.render(&walk, &ctx).unwrap(), "city=Lisbon;zip=1000;");
        let value = t.context(&input);
        let contact = value.get_attr("contact").unwrap();
        assert_eq!(contact.get_attr("name").unwrap().as_str(), Some("Ana"));
        assert!(contact.get_attr("wa_id").unwrap().is_undefined());
        for unnamed in ["message", "reply", "state", "account", "match"] {
            assert!(value.get_attr(unnamed).unwrap().is_undefined(), "{unnamed}");
        }
    }

    #[test]
    fn literals_skip_the_engine_and_syntax_errors_are_reported() {
        let mut t = Templates::default();
        assert!(matches!(t.add("plain {text}").unwrap(), Text::Literal(_)));
        let err = t.add("{{ unclosed").unwrap_err();
        assert!(err.starts_with("template error"), "{err}");
    }
}
