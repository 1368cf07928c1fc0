//! Declarative rules from `routes.toml` (SPEC §5): compile, match, plan.
//!
//! A [`Ruleset`] is immutable. Reload compiles a new one and swaps it in
//! atomically ([`Rules`]); a file that fails to compile leaves the old rules
//! in force and its error visible in `/healthz`.

pub mod compile;
pub mod matcher;
pub mod model;
pub mod reload;
pub mod render;
pub mod route;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use arc_swap::ArcSwap;
use serde_json::Value;

use crate::domain::{Located, Millis, now_ms};
use crate::inbound::InboundMessage;
use crate::message::validate::validate;
use crate::message::{Content, MessageType};
pub use matcher::{Facts, Hit, Prepared};
use render::{Context, RenderInput, Templates, Text};

/// Consent keywords (normalized) and replies (SPEC §4).
#[derive(Debug)]
pub struct Consent {
    pub opt_out: Vec<String>,
    pub opt_in: Vec<String>,
    pub opt_out_reply: Option<Text>,
    pub opt_in_reply: Option<Text>,
}

/// One compiled rule's actions.
#[derive(Debug)]
pub struct Rule {
    pub name: String,
    pub set_state: Option<Text>,
    pub set: Vec<(String, Text)>,
    pub mark_read: bool,
    /// A typing indicator on the inbound message before the first send.
    pub typing: bool,
    pub sends: Vec<SendTemplate>,
    pub forward: Vec<String>,
    pub handoff: bool,
}

/// A send entry compiled to Meta's message object, with the JSON pointers
/// of its templated strings.
#[derive(Debug)]
pub struct SendTemplate {
    pub kind: MessageType,
    pub object: SendObject,
    /// Where in the tree each templated string goes (none: `Fixed`).
    pub slots: Vec<(String, Text)>,
    pub quote: bool,
}

/// The object of a send entry.
#[derive(Debug)]
pub enum SendObject {
    /// No string of it is a template: as sent, checked at load.
    Fixed(crate::message::Object),
    /// The tree the slots are rendered into, checked after each render.
    Slotted(Value),
}

/// A compiled rule file.
#[derive(Debug)]
pub struct Ruleset {
    pub rules: Vec<Rule>,
    matcher: matcher::Matcher,
    pub consent: Consent,
    templates: Templates,
    /// Whether any rule uses `reply_to_tag` (only then is the replied-to
    /// message looked up).
    pub uses_reply_tags: bool,
}

/// What running a rule on a message decides; the caller applies it.
#[derive(Debug)]
pub struct Plan {
    pub rule: String,
    /// Named regex captures of the match (`{{ match.NAME }}`).
    pub captures: Vec<(String, String)>,
    pub set_state: Option<String>,
    pub set_vars: Vec<(String, String)>,
    pub mark_read: bool,
    pub typing: bool,
    /// Rendered messages, or why one could not be rendered.
    pub sends: Vec<Result<Content, String>>,
    pub forward: Vec<String>,
    pub handoff: bool,
}

/// What the consent keywords say of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsentKeyword {
    OptOut,
    OptIn,
}

impl Ruleset {
    /// A ruleset with no rules and the default consent keywords.
    pub fn empty() -> Self {
        compile::compile("<none>", "", &[]).expect("an empty rule file compiles")
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether the message's text is a consent keyword.
    pub fn consent_keyword(&self, msg: &InboundMessage) -> Option<ConsentKeyword> {
        let norm = crate::domain::normalize_text(msg.text.as_deref()?);
        if msg.kind != crate::inbound::InboundKind::Text
            && msg.kind != crate::inbound::InboundKind::Button
        {
            return None;
        }
        if self.consent.opt_out.contains(&norm) {
            Some(ConsentKeyword::OptOut)
        } else if self.consent.opt_in.contains(&norm) {
            Some(ConsentKeyword::OptIn)
        } else {
            None
        }
    }

    /// The first rule whose `when` holds for `msg`.
    pub fn first_match(&self, msg: &InboundMessage, facts: Facts<'_>) -> Option<Hit> {
        self.matcher.first_match(&Prepared::new(msg, facts))
    }

    /// Run the actions of the matched rule: render state, vars and sends.
    /// `set_state` is applied before `set`, and both before `send` renders.
    pub fn plan(
        &self,
        hit: &Hit,
        msg: &InboundMessage,
        account: &str,
        state: &str,
        vars: &BTreeMap<String, String>,
    ) -> Plan {
        let rule = &self.rules[hit.rule];
        // Borrowed until a rule changes them; contexts built on first use.
        let mut input_vars = Cow::Borrowed(vars);
        let mut state_now = Cow::Borrowed(state);
        let mut new_state = None;
        if let Some(t) = &rule.set_state {
            let s = self
                .templates
                .render(t, &context_of(msg, account, hit, &state_now, &input_vars))
                .unwrap_or_default();
            state_now = Cow::Owned(s.clone());
            new_state = Some(s);
        }
        let mut set_vars = Vec::new();
        if !rule.set.is_empty() {
            let ctx = context_of(msg, account, hit, &state_now, &input_vars);
            for (name, t) in &rule.set {
                let v = self.templates.render(t, &ctx).unwrap_or_default();
                set_vars.push((name.clone(), v));
            }
            for (k, v) in &set_vars {
                input_vars.to_mut().insert(k.clone(), v.clone());
            }
        }
        let ctx = context_of(msg, account, hit, &state_now, &input_vars);
        let sends = rule
            .sends
            .iter()
            .map(|s| self.render_send(s, msg, &ctx))
            .collect();
        Plan {
            rule: rule.name.clone(),
            captures: hit.captures.clone(),
            set_state: new_state,
            set_vars,
            mark_read: rule.mark_read,
            typing: rule.typing,
            sends,
            forward: rule.forward.clone(),
            handoff: rule.handoff,
        }
    }

    fn render_send(
        &self,
        s: &SendTemplate,
        msg: &InboundMessage,
        ctx: &Context<'_>,
    ) -> Result<Content, String> {
        let object = match &s.object {
            SendObject::Fixed(fixed) => fixed.clone(),
            SendObject::Slotted(tree) => {
                let mut object = tree.clone();
                for (pointer, text) in &s.slots {
                    let rendered = self.templates.render(text, ctx)?;
                    if let Some(slot) = object.pointer_mut(pointer) {
                        *slot = Value::String(rendered);
                    }
                }
                validate(s.kind.as_str(), &object).map_err(|e| e.to_string())?;
                crate::message::Object::new(&object)
            }
        };
        Ok(Content {
            kind: s.kind,
            object,
            context_id: s.quote.then(|| msg.wamid.clone()),
        })
    }

    /// The rendered opt-out or opt-in reply, if the file sets one.
    pub fn consent_reply(
        &self,
        which: ConsentKeyword,
        msg: &InboundMessage,
        account: &str,
    ) -> Option<Result<Content, String>> {
        let text = match which {
            ConsentKeyword::OptOut => self.consent.opt_out_reply.as_ref()?,
            ConsentKeyword::OptIn => self.consent.opt_in_reply.as_ref()?,
        };
        let vars = BTreeMap::new();
        let ctx = Context::new(RenderInput {
            message: msg,
            account,
            captures: &[],
            state: "",
            vars: &vars,
        });
        Some(self.templates.render(text, &ctx).and_then(|body| {
            let object = serde_json::json!({ "body": body });
            validate("text", &object).map_err(|e| e.to_string())?;
            Ok(Content {
                kind: MessageType::Text,
                object: object.into(),
                context_id: None,
            })
        }))
    }
}

/// What the strings of a matched rule are rendered with.
fn context_of<'a>(
    msg: &'a InboundMessage,
    account: &'a str,
    hit: &'a Hit,
    state: &'a str,
    vars: &'a BTreeMap<String, String>,
) -> Context<'a> {
    Context::new(RenderInput {
        message: msg,
        account,
        captures: &hit.captures,
        state,
        vars,
    })
}

/// Read and compile a rule file.
pub fn load_file(path: &Path, targets: &[String]) -> Result<Ruleset, Vec<Located>> {
    let name = path.display().to_string();
    let source = std::fs::read_to_string(path).map_err(|e| {
        vec![Located {
            file: name.clone(),
            line: 1,
            col: 1,
            message: format!("cannot read the rule file: {e}"),
        }]
    })?;
    compile::compile(&name, &source, targets)
}

/// The load state of the rule file, for `/healthz`.
#[derive(Debug, Clone)]
pub struct RulesStatus {
    pub rules: usize,
    pub loaded_at: Millis,
    pub last_error: Option<String>,
}

/// The rules in force, swapped atomically on reload.
pub struct Rules {
    current: ArcSwap<Ruleset>,
    status: Mutex<RulesStatus>,
    path: PathBuf,
    targets: Vec<String>,
}

impl Rules {
    /// Load the rule file at startup; errors are returned, not kept.
    pub fn load(path: &Path, targets: Vec<String>) -> Result<Self, Vec<Located>> {
        let set = load_file(path, &targets)?;
        Ok(Rules {
            status: Mutex::new(RulesStatus {
                rules: set.len(),
                loaded_at: now_ms(),
                last_error: None,
            }),
            current: ArcSwap::from_pointee(set),
            path: path.to_path_buf(),
            targets,
        })
    }

    /// The rules in force now.
    pub fn get(&self) -> Arc<Ruleset> {
        self.current.load_full()
    }

    pub fn status(&self) -> RulesStatus {
        self.status.lock().clone()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Compile the file again and swap it in; on error keep the old rules
    /// and record the error. Returns whether the new file is in force.
    pub fn reload(&self) -> bool {
        match load_file(&self.path, &self.targets) {
            Ok(set) => {
                let n = set.len();
                self.current.store(Arc::new(set));
                *self.status.lock() = RulesStatus {
                    rules: n,
                    loaded_at: now_ms(),
                    last_error: None,
                };
                tracing::info!(rules = n, file = %self.path.display(), "rules reloaded");
                true
            }
            Err(errors) => {
                let text = errors
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("\n");
                tracing::error!(file = %self.path.display(), errors = %text, "rule file invalid; the previous rules stay in force");
                self.status.lock().last_error = Some(text);
                false
            }
        }
    }
}
