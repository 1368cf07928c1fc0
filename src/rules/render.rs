//! String templates of rule files: compiled once at load into one
//! minijinja environment per ruleset, rendered per inbound message.
//!
//! Strings without `{{`/`{%` never touch the template engine, nor do
//! strings whose only syntax is names in braces (`Hi {{ contact.name }}`):
//! those are filled in directly (no context to build, no engine state).

use std::collections::BTreeMap;

use minijinja::{Environment, UndefinedBehavior, Value};

use crate::inbound::InboundMessage;

/// A string of a rule file: literal, literal text and names, or the name
/// of a compiled template.
#[derive(Debug, Clone)]
pub enum Text {
    Literal(String),
    Names(Vec<Piece>),
    Template(String),
}

/// A part of a [`Text::Names`] string.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Literal(String),
    /// `{{ group.field }}`, or `{{ state }}` (no field).
    Name(Group, String),
}

/// The groups of names a template may use (SPEC §5).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Group {
    Contact,
    Message,
    Reply,
    Account,
    Match,
    Vars,
    State,
}

/// `source` as literal text and `{{ group.field }}` names only, or `None`
/// when it uses anything else of the template language (then the engine
/// renders it). Nothing that would render differently: no whitespace
/// control, no other tags, no trailing newline (the engine drops one).
fn names_only(source: &str) -> Option<Vec<Piece>> {
    fn ident(s: &str) -> bool {
        let mut chars = s.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !matches!(
                s,
                "true"
                    | "false"
                    | "none"
                    | "True"
                    | "False"
                    | "None"
                    | "and"
                    | "or"
                    | "not"
                    | "in"
                    | "is"
                    | "if"
                    | "else"
            )
    }
    if source.ends_with(['\n', '\r']) {
        return None;
    }
    let mut pieces = Vec::new();
    let mut rest = source;
    while !rest.is_empty() {
        let (literal, after) = match rest.find("{{") {
            Some(i) => (&rest[..i], Some(&rest[i + 2..])),
            None => (rest, None),
        };
        if literal.contains("{%") || literal.contains("{#") {
            return None;
        }
        if !literal.is_empty() {
            pieces.push(Piece::Literal(literal.to_string()));
        }
        let Some(after) = after else { break };
        let end = after.find("}}")?;
        let inner = &after[..end];
        if inner.starts_with(['-', '+']) || inner.ends_with(['-', '+']) {
            return None;
        }
        let name = inner.trim_matches([' ', '\t']);
        let (group, field) = match name.split_once('.') {
            Some((g, f)) if ident(f) => (g, f),
            None if name == "state" => ("state", ""),
            _ => return None,
        };
        let group = match group {
            "contact" => Group::Contact,
            "message" => Group::Message,
            "reply" => Group::Reply,
            "account" => Group::Account,
            "match" => Group::Match,
            "vars" => Group::Vars,
            "state" if field.is_empty() => Group::State,
            _ => return None,
        };
        pieces.push(Piece::Name(group, field.to_string()));
        rest = &after[end + 2..];
    }
    Some(pieces)
}

/// `{{ group.field }}` of `input`, as the engine renders it from
/// [`Templates::context`]: missing values are empty.
fn value_of<'a>(input: &RenderInput<'a>, group: Group, field: &str) -> &'a str {
    fn text(v: &Option<String>) -> &str {
        v.as_deref().unwrap_or_default()
    }
    let m = input.message;
    match (group, field) {
        (Group::Contact, "name") => text(&m.contact_name),
        (Group::Contact, "wa_id") => m.from.as_str(),
        (Group::Contact, "user_id") => text(&m.user_id),
        (Group::Contact, "username") => text(&m.username),
        (Group::Message, "id") => m.wamid.as_str(),
        (Group::Message, "type") => m.kind.as_str(),
        (Group::Message, "text") => text(&m.text),
        (Group::Reply, "id") => m.reply.as_ref().map_or("", |r| r.id.as_str()),
        (Group::Reply, "title") => m.reply.as_ref().map_or("", |r| r.title.as_str()),
        (Group::Account, "name") => input.account,
        // The last of a name wins, as in the context's map.
        (Group::Match, name) => input
            .captures
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str()),
        (Group::Vars, name) => input.vars.get(name).map_or("", String::as_str),
        (Group::State, _) => input.state,
        _ => "",
    }
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
        if let Some(pieces) = names_only(source) {
            return Ok(Text::Names(pieces));
        }
        self.add_to_engine(source)
    }

    /// Compile `source` as an engine template.
    fn add_to_engine(&mut self, source: &str) -> Result<Text, String> {
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

    /// Render `text` with `ctx` (the engine's context is built only if
    /// `text` needs the engine).
    pub fn render(&self, text: &Text, ctx: &Context<'_>) -> Result<String, String> {
        match text {
            Text::Literal(s) => Ok(s.clone()),
            Text::Names(pieces) => {
                let mut out = String::new();
                for piece in pieces {
                    match piece {
                        Piece::Literal(s) => out.push_str(s),
                        Piece::Name(group, field) => {
                            out.push_str(value_of(&ctx.input, *group, field));
                        }
                    }
                }
                Ok(out)
            }
            Text::Template(name) => {
                let t = self
                    .env
                    .get_template(name)
                    .map_err(|e| template_error(&e))?;
                let value = ctx.value.get_or_init(|| self.context(&ctx.input));
                t.render(value).map_err(|e| template_error(&e))
            }
        }
    }
}

/// What the strings of one rule are rendered with; the engine's context
/// is built on first use: a rule whose strings are all literal or names
/// (most replies) builds none.
pub struct Context<'a> {
    input: RenderInput<'a>,
    value: std::cell::OnceCell<Value>,
}

impl<'a> Context<'a> {
    pub fn new(input: RenderInput<'a>) -> Self {
        Context {
            input,
            value: std::cell::OnceCell::new(),
        }
    }
}

fn template_error(e: &minijinja::Error) -> String {
    match e.detail() {
        Some(detail) => format!("template error: {detail}"),
        None => format!("template error: {}", e.kind()),
    }
}

/// Everything a template may name (SPEC §5).
#[derive(Clone, Copy)]
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
        // The fixed fields, as names in braces render them ([`value_of`]).
        let mut fields = |name, group_of, fields: &[&'static str]| {
            group(
                name,
                &mut fields.iter().map(|f| (*f, value_of(input, group_of, f))),
            );
        };
        fields(
            "contact",
            Group::Contact,
            &["name", "wa_id", "user_id", "username"],
        );
        fields("message", Group::Message, &["id", "type", "text"]);
        // `reply` is empty unless the message answers a button or a list.
        let reply: &[&str] = if m.reply.is_some() {
            &["id", "title"]
        } else {
            &[]
        };
        fields("reply", Group::Reply, reply);
        fields("account", Group::Account, &["name"]);
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
        t.render(&text, &Context::new(*input))
    }

    /// A button or list answer from a contact named Ana.
    fn from_ana(kind: InboundKind, id: &str, title: &str) -> InboundMessage {
        InboundMessage {
            contact_name: Some("Ana".into()),
            ..InboundMessage::test_reply(kind, id, title)
        }
    }

    /// What a rule of account "main" renders for `msg` in state "menu".
    fn in_menu<'a>(
        msg: &'a InboundMessage,
        captures: &'a [(String, String)],
        vars: &'a BTreeMap<String, String>,
    ) -> RenderInput<'a> {
        RenderInput {
            message: msg,
            account: "main",
            captures,
            state: "menu",
            vars,
        }
    }

    #[test]
    fn every_name_of_the_spec_renders_and_missing_ones_are_empty() {
        let msg = from_ana(InboundKind::Button, "yes", "Yes please");
        let vars = BTreeMap::from([("city".to_string(), "Lisbon".to_string())]);
        let captures = [("n".to_string(), "42".to_string())];
        let input = in_menu(&msg, &captures, &vars);
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
        let msg = from_ana(InboundKind::Button, "yes", "Yes please");
        let vars = BTreeMap::from([
            ("city".to_string(), "Lisbon".to_string()),
            ("zip".to_string(), "1000".to_string()),
        ]);
        let input = in_menu(&msg, &[], &vars);
        let mut t = Templates::default();
        // (Names alone skip the engine: this one is taken to it.)
        let greet = t.add_to_engine("Hi {{ contact.name }}").unwrap();
        let walk = t
            .add("{% for k, v in vars|items %}{{ k }}={{ v }};{% endfor %}")
            .unwrap();
        let ctx = Context::new(input);
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
    fn names_in_braces_skip_the_engine_and_render_as_it_would() {
        let msg = from_ana(InboundKind::List, "row-2", "Row <two> & \"3\"");
        let vars = BTreeMap::from([("city".to_string(), "Lisbon".to_string())]);
        let captures = [
            ("n".to_string(), "1".to_string()),
            ("n".to_string(), "2".to_string()),
        ];
        let input = in_menu(&msg, &captures, &vars);
        let mut both = 0;
        for source in [
            "Hi {{ contact.name }}! {{contact.wa_id}} {{ contact.user_id }}{{ contact.username }}",
            "{{ message.id }} {{ message.type }} [{{ message.text }}]",
            "You picked {{ reply.title }} ({{ reply.id }}).",
            "{{ match.n }}|{{ match.x }}|{{ vars.city }}|{{ vars.nope }}|{{ state }}|{{ account.name }}",
            "{{ contact.nope }}{{ reply.nope }}{{ account.nope }} }} {",
            "  {{\tmessage.text\t}}  ",
            // The engine's: whitespace control, filters, tags, whole groups,
            // a trailing newline, keywords, unknown groups.
            "{{- message.text }}",
            "{{ message.text|upper }}",
            "{% if state %}x{% endif %}{{ state }}",
            "{# note #}{{ state }}",
            "{{ contact }}",
            "{{ state }}\n",
            "{{ vars.none }}",
            "{{ nope.x }}",
            "{{ state.x }}",
        ] {
            let mut t = Templates::default();
            let text = t.add(source).unwrap();
            let fast = t.render(&text, &Context::new(input)).unwrap();
            let engine = t.add_to_engine(source).unwrap();
            let slow = t.render(&engine, &Context::new(input)).unwrap();
            assert_eq!(fast, slow, "{source}");
            both += usize::from(matches!(text, Text::Names(_)));
        }
        assert_eq!(both, 6);
    }

    #[test]
    fn literals_skip_the_engine_and_syntax_errors_are_reported() {
        let mut t = Templates::default();
        assert!(matches!(t.add("plain {text}").unwrap(), Text::Literal(_)));
        let err = t.add("{{ unclosed").unwrap_err();
        assert!(err.starts_with("template error"), "{err}");
    }
}
