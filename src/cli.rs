//! The command line (SPEC §1): `serve`, `check`, `simulate`, `sign`.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};

use crate::app::App;
use crate::config::{self, Overrides, Settings};
use crate::domain::{now_ms, parse_phone};
use crate::inbound::{InboundKind, InboundMessage, ReplyChoice};
use crate::outbound::graph::send_body;
use crate::rules::{ConsentKeyword, Ruleset};
use crate::telemetry::{self, LogFormat};

/// wa-router: a self-hosted, webhook-first WhatsApp conversation router.
#[derive(Debug, Parser)]
#[command(name = "wa-router", version, about)]
pub struct Cli {
    /// Log format on stderr (filter with RUST_LOG).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "text",
        env = "WA_ROUTER_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server. Without -c, reads ./wa-router.toml if present, else runs on embedded defaults (sandbox mode).
    Serve {
        /// Configuration file.
        #[arg(short = 'c', long = "config", env = "WA_ROUTER_CONFIG")]
        config: Option<PathBuf>,
        /// Listen address, overriding the file (e.g. 0.0.0.0:8080).
        #[arg(long, env = "WA_ROUTER_LISTEN")]
        listen: Option<String>,
        /// Let sandbox mode with the public "sandbox" credentials listen on a non-loopback address.
        #[arg(long, env = "WA_ROUTER_ALLOW_REMOTE_SANDBOX")]
        allow_remote_sandbox: bool,
    },
    /// Load and validate a rule file: prints `ok: N rules`, or every error as FILE:LINE:COL: message (exit 1).
    Check {
        /// Rule file (default: the one the configuration names, else ./routes.toml).
        routes: Option<PathBuf>,
        /// Configuration file (for the event targets that `forward` may name).
        #[arg(short = 'c', long = "config")]
        config: Option<PathBuf>,
    },
    /// Run one synthetic inbound message through the rules, without network; print the result as JSON.
    Simulate(SimulateArgs),
    /// Print the X-Hub-Signature-256 value (sha256=<hex>) of FILE, or of stdin.
    Sign {
        /// The app secret. Prefer the environment variable WA_APP_SECRET or
        /// --secret-file: a value given here is visible to other users in
        /// the process list.
        #[arg(
            long,
            env = "WA_APP_SECRET",
            hide_env_values = true,
            required_unless_present = "secret_file",
            conflicts_with = "secret_file"
        )]
        secret: Option<String>,
        /// Read the app secret from this file (its first line).
        #[arg(long)]
        secret_file: Option<PathBuf>,
        /// The body to sign (default: stdin).
        file: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum WindowArg {
    Open,
    Closed,
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// Configuration file.
    #[arg(short = 'c', long = "config")]
    config: Option<PathBuf>,
    /// Rule file (default: the one the configuration names).
    #[arg(long)]
    routes: Option<PathBuf>,
    /// The contact's number (E.164, `+` optional).
    #[arg(long)]
    from: String,
    /// An inbound text.
    #[arg(long, group = "message")]
    text: Option<String>,
    /// An interactive button reply (or template quick-reply) with this id.
    #[arg(long, group = "message")]
    button: Option<String>,
    /// A list reply with this row id.
    #[arg(long, group = "message")]
    list: Option<String>,
    /// A message of this type without content (image, location, …).
    #[arg(long = "type", group = "message")]
    kind: Option<String>,
    /// The conversation state before the message.
    #[arg(long, default_value = "")]
    state: String,
    /// Whether a 24 h window was open before the message.
    #[arg(long, value_enum, default_value = "open")]
    window: WindowArg,
    /// The conversation is handed off to a person (no rules run).
    #[arg(long)]
    handoff: bool,
    /// The contact opted out before the message.
    #[arg(long = "opted-out")]
    opted_out: bool,
    /// The contact's profile name.
    #[arg(long, default_value = "")]
    name: String,
    /// The account name (default: the configured default account, else "sandbox").
    #[arg(long)]
    account: Option<String>,
}

/// Parse the command line and run it.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            listen,
            allow_remote_sandbox,
        } => serve(
            config.as_deref(),
            Overrides {
                listen,
                allow_remote_sandbox,
            },
            cli.log_format,
        ),
        Command::Check { routes, config } => check(routes.as_deref(), config.as_deref()),
        Command::Simulate(args) => simulate(&args),
        Command::Sign {
            secret,
            secret_file,
            file,
        } => {
            let secret = match (secret, secret_file) {
                (Some(s), _) => s,
                (None, Some(path)) => match std::fs::read_to_string(&path) {
                    Ok(text) => text.lines().next().unwrap_or_default().to_string(),
                    Err(e) => {
                        eprintln!("cannot read {}: {e}", path.display());
                        return ExitCode::from(1);
                    }
                },
                (None, None) => {
                    eprintln!("give --secret, --secret-file or WA_APP_SECRET");
                    return ExitCode::from(2);
                }
            };
            if secret.is_empty() {
                eprintln!("the app secret is empty");
                return ExitCode::from(1);
            }
            sign(&secret, file.as_deref())
        }
    }
}

fn load_settings(path: Option<&Path>, overrides: &Overrides) -> Result<Settings, ExitCode> {
    config::load(path, overrides).map_err(|e| {
        eprintln!("{e}");
        ExitCode::from(1)
    })
}

fn serve(config: Option<&Path>, overrides: Overrides, format: LogFormat) -> ExitCode {
    telemetry::init(format);
    let settings = match load_settings(config, &overrides) {
        Ok(s) => s,
        Err(code) => return code,
    };
    if settings.ops_key.is_none() && !config::is_loopback(&settings.listen) {
        tracing::warn!(
            listen = %settings.listen,
            "/metrics and /healthz answer anyone who reaches this address and name accounts, rules and targets; set [ops] key to require a key"
        );
    }
    if settings.sandbox {
        tracing::warn!(
            "SANDBOX MODE: no account has an access token. Nothing is sent to WhatsApp; app secret, verify token and API key are all \"sandbox\" unless configured. Do not expose this server."
        );
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(crate::memory::collect_if_due)
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        crate::memory::wake_workers_when_quiet();
        let listen = settings.listen.clone();
        let routes = settings.routes_path.display().to_string();
        let app = match App::build(settings).await {
            Ok(app) => app,
            Err(e) => {
                eprintln!("{e}");
                return ExitCode::from(1);
            }
        };
        tracing::info!(listen = %listen, port = app.port(), routes = %routes, "wa-router listening");
        match app.run_until_stopped().await {
            Ok(()) => {
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("server error: {e}");
                ExitCode::from(1)
            }
        }
    })
}

/// The rule file and target names for `check` and `simulate`.
fn rules_source(
    routes: Option<&Path>,
    config: Option<&Path>,
) -> Result<(PathBuf, Vec<String>, Option<Settings>), ExitCode> {
    let settings = match config {
        Some(_) => Some(load_settings(config, &Overrides::default())?),
        None if Path::new(config::DEFAULT_CONFIG).is_file() => {
            Some(load_settings(None, &Overrides::default())?)
        }
        None => None,
    };
    let targets = settings
        .as_ref()
        .map(|s| s.targets.iter().map(|t| t.name.clone()).collect())
        .unwrap_or_default();
    let path = routes
        .map(Path::to_path_buf)
        .or_else(|| settings.as_ref().map(|s| s.routes_path.clone()))
        .unwrap_or_else(|| PathBuf::from("routes.toml"));
    Ok((path, targets, settings))
}

fn check(routes: Option<&Path>, config: Option<&Path>) -> ExitCode {
    let (path, targets, _) = match rules_source(routes, config) {
        Ok(x) => x,
        Err(code) => return code,
    };
    match crate::rules::load_file(&path, &targets) {
        Ok(set) => {
            println!("ok: {} rules", set.len());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            eprintln!("{} error(s) in {}", errors.len(), path.display());
            ExitCode::from(1)
        }
    }
}

fn simulate(args: &SimulateArgs) -> ExitCode {
    let (path, targets, settings) =
        match rules_source(args.routes.as_deref(), args.config.as_deref()) {
            Ok(x) => x,
            Err(code) => return code,
        };
    let rules = match crate::rules::load_file(&path, &targets) {
        Ok(r) => r,
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            return ExitCode::from(1);
        }
    };
    let Some(from) =
        parse_phone(&args.from).or_else(|| (!args.from.is_empty()).then(|| args.from.clone()))
    else {
        eprintln!("--from needs the contact's number");
        return ExitCode::from(1);
    };
    let (kind, text, reply) = match (&args.text, &args.button, &args.list, &args.kind) {
        (Some(t), _, _, _) => (InboundKind::Text, Some(t.clone()), None),
        (_, Some(b), _, _) => (
            InboundKind::Button,
            Some(b.clone()),
            Some(ReplyChoice {
                id: b.clone(),
                title: b.clone(),
            }),
        ),
        (_, _, Some(l), _) => (
            InboundKind::List,
            Some(l.clone()),
            Some(ReplyChoice {
                id: l.clone(),
                title: l.clone(),
            }),
        ),
        (_, _, _, Some(k)) => match InboundKind::parse(k) {
            Some(kind) => (kind, None, None),
            None => {
                let all: Vec<&str> = InboundKind::ALL.iter().map(|k| k.as_str()).collect();
                eprintln!("--type {k:?} is not one of {}", all.join(", "));
                return ExitCode::from(1);
            }
        },
        _ => {
            eprintln!("give one of --text, --button, --list or --type");
            return ExitCode::from(1);
        }
    };
    let account = args.account.clone().unwrap_or_else(|| {
        settings
            .as_ref()
            .and_then(|s| {
                s.accounts
                    .iter()
                    .find(|a| a.default)
                    .map(|a| a.name.clone())
            })
            .unwrap_or_else(|| "sandbox".into())
    });
    let msg = InboundMessage {
        wamid: format!("wamid.simulated.{}", uuid::Uuid::now_v7().simple()).into(),
        from: from.clone().into(),
        contact_name: (!args.name.is_empty()).then(|| args.name.clone()),
        user_id: None,
        username: None,
        timestamp: now_ms(),
        kind,
        raw_type: kind.as_str().to_string(),
        text,
        reply,
        context_id: None,
        opens_window: !matches!(kind, InboundKind::Reaction | InboundKind::Unsupported),
        raw: serde_json::value::RawValue::from_string("{}".into()).expect("valid JSON"),
    };
    let out = simulate_message(
        &rules,
        &msg,
        Simulated {
            account: &account,
            state: &args.state,
            window_was_open: args.window == WindowArg::Open,
            handed_off: args.handoff,
            opted_out: args.opted_out,
        },
    );
    println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    ExitCode::SUCCESS
}

/// The conversation `simulate` pretends the message arrives in.
#[derive(Debug, Clone, Copy)]
pub struct Simulated<'a> {
    pub account: &'a str,
    pub state: &'a str,
    /// A 24 h window was open before the message.
    pub window_was_open: bool,
    /// A person has the conversation (no rules run).
    pub handed_off: bool,
    /// The contact opted out before the message.
    pub opted_out: bool,
}

/// What the rules do with one message, as JSON (no state, no network):
/// the same routing step ([`crate::rules::route::route`]) and send policy
/// ([`crate::outbound::policy::check`]) as the router.
pub fn simulate_message(rules: &Ruleset, msg: &InboundMessage, conv: Simulated<'_>) -> Value {
    use crate::outbound::policy;
    use crate::rules::route::{ConversationFacts, Outcome, route};
    let window_open = conv.window_was_open || msg.opens_window;
    let new_conversation = !conv.window_was_open && msg.opens_window;
    let vars = BTreeMap::new();
    let decision = route(
        rules,
        msg,
        ConversationFacts {
            account: conv.account,
            state: conv.state,
            vars: &vars,
            new_conversation,
            handed_off: conv.handed_off,
            reply_tags: &[],
        },
    );
    let now = now_ms();
    let mut opted_out = conv.opted_out;
    let (mut messages, mut refused, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    let mut push = |content: Result<crate::outbound::Content, String>,
                    opted_out: bool,
                    bypass_consent: bool| match content {
        Ok(c) => {
            let body = json!(send_body(&msg.from, &c));
            let facts = policy::Facts {
                now,
                is_template: c.is_template(),
                window_open,
                opted_out,
                bypass_consent,
                expires_at: crate::domain::Millis::MAX,
            };
            match policy::check(facts) {
                Ok(()) => messages.push(body),
                Err(e) => refused.push(json!({ "reason": e.code(), "body": body })),
            }
        }
        Err(e) => errors.push(Value::String(e)),
    };
    let mut out = serde_json::Map::new();
    if let Some(consent) = decision.consent {
        opted_out = consent.keyword == ConsentKeyword::OptOut;
        if let Some(reply) = consent.reply {
            push(reply, opted_out, true);
        }
        let which = if opted_out { "opt_out" } else { "opt_in" };
        out.insert("consent".into(), which.into());
    }
    out.insert("rule".into(), Value::Null);
    out.insert("new_conversation".into(), new_conversation.into());
    match decision.outcome {
        Outcome::HandedOff => {
            out.insert("handed_off".into(), true.into());
        }
        Outcome::Consumed | Outcome::NoMatch => {}
        Outcome::Rule(plan) => {
            for content in plan.sends {
                push(content, opted_out, false);
            }
            let strings = |pairs: Vec<(String, String)>| {
                pairs
                    .into_iter()
                    .map(|(k, v)| (k, Value::String(v)))
                    .collect::<serde_json::Map<_, _>>()
            };
            out.insert("rule".into(), plan.rule.into());
            out.insert("match".into(), strings(plan.captures).into());
            out.insert("set_state".into(), json!(plan.set_state));
            out.insert("set".into(), strings(plan.set_vars).into());
            out.insert("mark_read".into(), plan.mark_read.into());
            out.insert("typing".into(), plan.typing.into());
            out.insert("forward".into(), json!(plan.forward));
            out.insert("handoff".into(), plan.handoff.into());
        }
    }
    out.insert("messages".into(), messages.into());
    out.insert("refused".into(), refused.into());
    out.insert("errors".into(), errors.into());
    Value::Object(out)
}

fn sign(secret: &str, file: Option<&Path>) -> ExitCode {
    let mut body = Vec::new();
    let read = match file {
        Some(p) => std::fs::read(p).map(|b| body = b),
        None => std::io::stdin().read_to_end(&mut body).map(|_| ()),
    };
    if let Err(e) = read {
        eprintln!(
            "cannot read {}: {e}",
            file.map_or("stdin".into(), |p| p.display().to_string())
        );
        return ExitCode::from(1);
    }
    println!("{}", crate::crypto::sign(secret.as_bytes(), &body));
    ExitCode::SUCCESS
}
