//! `wa-router.toml` → [`Settings`]: typed, `${VAR}` expanded, validated.
//!
//! Precedence: embedded defaults < file < command-line flags. Unknown keys
//! and bad values are errors printed as `FILE:LINE:COL: message`. Nothing
//! reads the environment or the file after [`load`] returns.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::domain::{Located, Secret, parse_duration, parse_size};

/// Where the default configuration file is looked for.
pub const DEFAULT_CONFIG: &str = "wa-router.toml";
/// App secret, verify token and API key of sandbox mode (SPEC §2).
pub const SANDBOX_SECRET: &str = "sandbox";
/// The name [`load`] gives the embedded defaults (no configuration file).
pub const EMBEDDED: &str = "<embedded defaults>";

/// The router's whole configuration, immutable after startup.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: String,
    pub routes_path: PathBuf,
    /// `None` = memory only.
    pub data_dir: Option<PathBuf>,
    /// How long finished messages and idle conversations are kept.
    pub retention: Duration,
    pub meta: MetaSettings,
    pub accounts: Vec<AccountSettings>,
    pub api: ApiSettings,
    pub sender: SenderSettings,
    pub conversations: ConversationSettings,
    pub targets: Vec<TargetSettings>,
    pub http: HttpSettings,
    /// `[ops] key`: when set, `/metrics` and `/healthz` need it
    /// (`X-API-Key` or `Authorization: Bearer`); `/readyz` stays open.
    pub ops_key: Option<Secret>,
    /// Sandbox mode: no account has an access token (SPEC §2).
    pub sandbox: bool,
    /// Some secret is the public sandbox one (`"sandbox"`): only with no
    /// configuration file, or a file that says `[sandbox]
    /// public_credentials = true`; such a router listens on loopback only
    /// unless `allow_remote`.
    pub public_credentials: bool,
    /// Sandbox with public credentials may listen on a non-loopback address.
    pub sandbox_allow_remote: bool,
    /// The file these settings came from, if any.
    pub source: Option<PathBuf>,
    /// `[cluster]`: several routers sharing their state on Redis.
    pub cluster: Option<ClusterSettings>,
}

/// `[cluster]`: routers that share one Redis (see the README, "Running a
/// cluster").
#[derive(Debug, Clone)]
pub struct ClusterSettings {
    /// `redis://[user:password@]host:port[/db]`; may hold a password, so
    /// it is never logged whole.
    pub redis_url: Secret,
    /// This router's name in the cluster (default: hostname-pid).
    pub node_id: String,
    /// Prefix of every Redis key the cluster uses (default `wa-router:`).
    pub prefix: String,
    /// How long an account's lease lasts without renewal: the time another
    /// router takes over the sending of a router that died.
    pub lease_ttl: Duration,
    /// Bytes the shared log may take in Redis before the next snapshot
    /// (after which it is trimmed).
    pub snapshot_after: usize,
}

#[derive(Debug, Clone)]
pub struct MetaSettings {
    /// Any of these may sign a webhook (rotation).
    pub app_secrets: Vec<Secret>,
    pub verify_token: Secret,
    pub graph_url: String,
    pub graph_version: String,
    /// `[meta] graph_http`.
    pub graph_http: GraphHttp,
    pub max_body: usize,
}

/// `[meta] graph_http`: how sends reach the Graph API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum GraphHttp {
    /// HTTP/1.1: one connection per send in flight, pooled; as many sends
    /// await Meta at once as `max_in_flight` lets.
    #[default]
    #[serde(rename = "1.1")]
    Http1,
    /// HTTP/2: the sends share one connection, at most as many at once as
    /// Meta's server allows streams on it (its `SETTINGS_MAX_CONCURRENT_STREAMS`).
    #[serde(rename = "2")]
    Http2,
}

#[derive(Debug, Clone)]
pub struct AccountSettings {
    pub name: String,
    pub phone_number_id: String,
    /// Absent: a sandbox account that sends nothing over the network.
    pub access_token: Option<Secret>,
    /// Minimum interval between two send starts.
    pub pace: Duration,
    /// Sends started per second at most, as set in the file (`None`:
    /// Meta's throughput, see [`rate_for`](Self::rate_for)).
    pub rate: Option<u32>,
    /// Sends awaiting Meta's answer at once, at most (`None`: half a
    /// second of the rate, see [`default_max_in_flight`]).
    pub max_in_flight: Option<usize>,
    pub max_queue: usize,
    /// Finished outbound records kept; past it the oldest finished ones
    /// are dropped before `retention`.
    pub max_records: usize,
    pub default: bool,
}

#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub keys: Vec<Secret>,
    pub rate: u32,
    pub burst: u32,
}

#[derive(Debug, Clone)]
pub struct SenderSettings {
    pub max_attempts: u32,
    pub backoff: Duration,
    pub timeout: Duration,
    pub validity: Duration,
}

/// Limits of the HTTP server against slow or greedy clients.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// A request body must arrive whole within this (→ 408).
    pub body_timeout: Duration,
    /// Request bodies buffered at once, all requests together (→ 503).
    pub max_buffered: usize,
    /// Open connections, all workers together.
    pub max_connections: usize,
    /// Work the router may run behind before webhooks wait for it:
    /// acknowledged messages whose rules have not run, plus sends that are
    /// due now but not started (per account at most a tenth of a second of
    /// its `rate`).
    pub max_backlog: usize,
}

#[derive(Debug, Clone)]
pub struct ConversationSettings {
    pub handoff_ttl: Duration,
}

#[derive(Debug, Clone)]
pub struct TargetSettings {
    pub name: String,
    pub url: String,
    pub secret: Secret,
    pub messages: bool,
    pub statuses: bool,
    /// Account-level changes (`account.update`).
    pub account: bool,
    /// Bytes of undelivered events kept before the oldest are dropped.
    pub max_backlog_bytes: usize,
}

pub const DEFAULT_PACE: Duration = Duration::from_secs(10);
pub const DEFAULT_MAX_QUEUE: usize = 10_000;
pub const DEFAULT_MAX_RECORDS: usize = 5_000_000;
/// Meta's default throughput per business number (messages/s).
pub const DEFAULT_RATE: u32 = 80;
/// `max_in_flight` when unset: half a second of the account's `rate`
/// (Graph answers in 100–300 ms), at least this many.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 64;
/// Meta's throughput of an upgraded number (messages/s): the `rate` of an
/// account that sets none, once Meta announced the upgrade
/// (`phone_number_quality_update`, `THROUGHPUT_UPGRADE`).
pub const UPGRADED_RATE: u32 = 1000;

/// The default `max_in_flight` of an account sending `rate` a second: so
/// many sends awaiting answers that a Graph API answering within half a
/// second does not hold the number below its rate (500 at 1,000/s).
pub fn default_max_in_flight(rate: u32) -> usize {
    (rate as usize / 2).max(DEFAULT_MAX_IN_FLIGHT)
}
/// `[http] max_backlog`. A queue that waits for its pace, rate or a pause
/// counts nothing; one held by `max_in_flight` (Graph answers slower than
/// its rate) counts a tenth of a second of its `rate` (100 at 1,000/s), so
/// the default leaves room for a few such campaigns at once; under a
/// spike it is what a reply waits behind (BENCHMARKS.md).
pub const DEFAULT_MAX_BACKLOG: usize = 500;

impl AccountSettings {
    /// Send starts per second at most: `rate` as set, else Meta's default
    /// and, once Meta announced the number's upgrade, [`UPGRADED_RATE`].
    pub fn rate_for(&self, upgraded: bool) -> u32 {
        match self.rate {
            Some(rate) => rate,
            None if upgraded => UPGRADED_RATE,
            None => DEFAULT_RATE,
        }
    }

    /// Sends awaiting Meta's answer at once, at most.
    pub fn max_in_flight_for(&self, upgraded: bool) -> usize {
        self.max_in_flight
            .unwrap_or_else(|| default_max_in_flight(self.rate_for(upgraded)))
    }

    /// The least time between two send starts: `pace`, or `1/rate` if
    /// that is longer.
    pub fn spacing(&self, upgraded: bool) -> Duration {
        let per_rate = Duration::from_secs(1) / self.rate_for(upgraded).max(1);
        self.pace.max(per_rate)
    }

    /// A sandbox account registered from a webhook's `phone_number_id`.
    pub fn sandbox(phone_number_id: &str) -> Self {
        AccountSettings {
            name: phone_number_id.to_string(),
            phone_number_id: phone_number_id.to_string(),
            access_token: None,
            pace: DEFAULT_PACE,
            rate: None,
            max_in_flight: None,
            max_queue: DEFAULT_MAX_QUEUE,
            max_records: DEFAULT_MAX_RECORDS,
            default: false,
        }
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Located(#[from] Located),
    #[error("{file}: cannot read: {reason}")]
    Io { file: String, reason: String },
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
}

/// Command-line values that override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    /// `--allow-remote-sandbox`: as `[sandbox] allow_remote = true`.
    pub allow_remote_sandbox: bool,
}

// ---------------------------------------------------------------- file shape

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileIn {
    listen: Option<EnvString>,
    routes: Option<EnvString>,
    data_dir: Option<EnvString>,
    retention: Option<Dur>,
    meta: Option<MetaIn>,
    #[serde(default)]
    accounts: Vec<Spanned<AccountIn>>,
    api: Option<ApiIn>,
    sender: Option<SenderIn>,
    conversations: Option<ConversationsIn>,
    #[serde(default)]
    targets: BTreeMap<String, Spanned<TargetIn>>,
    sandbox: Option<SandboxIn>,
    http: Option<HttpIn>,
    ops: Option<OpsIn>,
    cluster: Option<Spanned<ClusterIn>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterIn {
    redis_url: Spanned<EnvString>,
    node_id: Option<Spanned<EnvString>>,
    prefix: Option<EnvString>,
    lease_ttl: Option<Spanned<Dur>>,
    snapshot_after: Option<Spanned<Size>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct OpsIn {
    key: Option<Spanned<EnvString>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpIn {
    body_timeout: Option<Dur>,
    max_buffered: Option<Size>,
    max_connections: Option<usize>,
    max_backlog: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SandboxIn {
    #[serde(default)]
    public_credentials: bool,
    #[serde(default)]
    allow_remote: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetaIn {
    app_secret: Option<Spanned<EnvStrings>>,
    verify_token: Option<Spanned<EnvString>>,
    graph_url: Option<EnvString>,
    graph_version: Option<EnvString>,
    graph_http: Option<GraphHttp>,
    max_body: Option<Size>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountIn {
    name: EnvString,
    phone_number_id: EnvString,
    access_token: Option<Spanned<EnvString>>,
    pace: Option<Dur>,
    rate: Option<Spanned<u32>>,
    max_in_flight: Option<Spanned<usize>>,
    max_queue: Option<usize>,
    max_records: Option<usize>,
    #[serde(default)]
    default: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiIn {
    keys: Option<Spanned<EnvStrings>>,
    rate: Option<u32>,
    burst: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SenderIn {
    max_attempts: Option<u32>,
    backoff: Option<Dur>,
    timeout: Option<Dur>,
    validity: Option<Dur>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConversationsIn {
    handoff_ttl: Option<Dur>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetIn {
    url: EnvString,
    secret: Spanned<EnvString>,
    events: Option<Vec<String>>,
    max_backlog: Option<Size>,
}

/// A string with `${VAR}` expanded from the environment.
#[derive(Debug, Clone)]
struct EnvString(String);

impl<'de> Deserialize<'de> for EnvString {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        expand_env(&raw, |name| std::env::var(name).ok())
            .map(EnvString)
            .map_err(serde::de::Error::custom)
    }
}

/// One string or a list of strings, each `${VAR}` expanded.
#[derive(Debug, Clone)]
struct EnvStrings(Vec<String>);

impl<'de> Deserialize<'de> for EnvStrings {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let crate::domain::Strings(raw) = crate::domain::Strings::deserialize(d)?;
        raw.iter()
            .map(|s| expand_env(s, |name| std::env::var(name).ok()))
            .collect::<Result<Vec<_>, _>>()
            .map(EnvStrings)
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy)]
struct Dur(Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        parse_duration(&raw)
            .map(Dur)
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy)]
struct Size(usize);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        parse_size(&raw).map(Size).map_err(serde::de::Error::custom)
    }
}

/// Expand every `${NAME}` in `raw` with `lookup`; an unset variable is an
/// error naming it.
pub fn expand_env(raw: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unclosed `${{` in {raw:?}"))?;
        let name = &after[..end];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "invalid environment variable name {name:?} in {raw:?}"
            ));
        }
        let value =
            lookup(name).ok_or_else(|| format!("environment variable {name} is not set"))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

// ---------------------------------------------------------------- loading

/// Load settings: `path` if given, else `./wa-router.toml` if present, else
/// the embedded defaults (sandbox mode).
pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Settings, ConfigError> {
    let chosen = match path {
        Some(p) => Some(p.to_path_buf()),
        None => Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.is_file()),
    };
    let mut settings = match chosen {
        Some(file) => {
            let source = std::fs::read_to_string(&file).map_err(|e| ConfigError::Io {
                file: file.display().to_string(),
                reason: e.to_string(),
            })?;
            from_str(&source, &file)?
        }
        None => from_str("", Path::new(EMBEDDED))?,
    };
    if let Some(listen) = &overrides.listen {
        settings.listen = listen.clone();
    }
    settings.sandbox_allow_remote |= overrides.allow_remote_sandbox;
    if settings.public_credentials
        && !settings.sandbox_allow_remote
        && !is_loopback(&settings.listen)
    {
        return Err(ConfigError::Invalid {
            file: settings
                .source
                .as_ref()
                .map_or_else(|| EMBEDDED.into(), |p| p.display().to_string()),
            message: format!(
                "sandbox mode with the public credentials (\"sandbox\") would listen on {}, which is not a loopback address: anyone who reaches it could use it. Configure [meta] app_secret, verify_token and [api] keys, or set [sandbox] allow_remote = true (--allow-remote-sandbox) if you mean it",
                settings.listen
            ),
        });
    }
    Ok(settings)
}

/// Whether `listen` (`host:port`) names a loopback address.
pub fn is_loopback(listen: &str) -> bool {
    let host = listen.rsplit_once(':').map_or(listen, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Parse and validate the text of a configuration file named `file`.
pub fn from_str(source: &str, file: &Path) -> Result<Settings, ConfigError> {
    let name = file.display().to_string();
    let parsed: FileIn = toml::from_str(source).map_err(|e| {
        let offset = e.span().map_or(0, |s| s.start);
        Located::at(&name, source, offset, e.message().trim_end().to_string())
    })?;
    let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let relative = |p: String| -> PathBuf {
        let p = PathBuf::from(p);
        if p.is_absolute() { p } else { base.join(p) }
    };
    let at = |span: std::ops::Range<usize>, msg: String| -> ConfigError {
        ConfigError::Located(Located::at(&name, source, span.start, msg))
    };

    // A secret that is present but empty (typically `${VAR}` with VAR set
    // to "") is an error: it must never fall back to anything.
    let empty = |span: std::ops::Range<usize>, key: &str| -> ConfigError {
        at(
            span,
            format!(
                "{key} is empty (an environment variable set to \"\"?); give a value or remove the key"
            ),
        )
    };
    let file_given = file != Path::new(EMBEDDED);

    let mut accounts = Vec::new();
    for spanned in &parsed.accounts {
        let a = spanned.get_ref();
        if let Some(t) = &a.access_token
            && t.get_ref().0.is_empty()
        {
            return Err(empty(
                t.span(),
                &format!("account {:?}: access_token", a.name.0),
            ));
        }
        let account = AccountSettings {
            name: a.name.0.clone(),
            phone_number_id: a.phone_number_id.0.clone(),
            access_token: a
                .access_token
                .as_ref()
                .map(|t| Secret::new(t.get_ref().0.clone())),
            pace: a.pace.map_or(DEFAULT_PACE, |d| d.0),
            rate: a.rate.as_ref().map(|r| *r.get_ref()),
            max_in_flight: a.max_in_flight.as_ref().map(|m| *m.get_ref()),
            max_queue: a.max_queue.unwrap_or(DEFAULT_MAX_QUEUE),
            max_records: a.max_records.unwrap_or(DEFAULT_MAX_RECORDS),
            default: a.default,
        };
        for (value, span, key) in [
            (
                a.rate.as_ref().map(|r| u64::from(*r.get_ref())),
                a.rate.as_ref().map(|r| r.span()),
                "rate",
            ),
            (
                a.max_in_flight.as_ref().map(|m| *m.get_ref() as u64),
                a.max_in_flight.as_ref().map(|m| m.span()),
                "max_in_flight",
            ),
        ] {
            if let (Some(0), Some(span)) = (value, span) {
                return Err(at(
                    span,
                    format!("account {:?}: {key} must be at least 1", account.name),
                ));
            }
        }
        if account.name.is_empty() || account.name.contains('/') {
            return Err(at(
                spanned.span(),
                "account name must be non-empty and contain no '/'".into(),
            ));
        }
        if account.phone_number_id.is_empty()
            || !account.phone_number_id.chars().all(|c| c.is_ascii_digit())
        {
            return Err(at(
                spanned.span(),
                format!("account {:?}: phone_number_id must be digits", account.name),
            ));
        }
        if account.max_queue == 0 || account.max_records == 0 {
            return Err(at(
                spanned.span(),
                format!(
                    "account {:?}: max_queue and max_records must be at least 1",
                    account.name
                ),
            ));
        }
        if accounts
            .iter()
            .any(|o: &AccountSettings| o.name == account.name)
        {
            return Err(at(
                spanned.span(),
                format!("account name {:?} is used twice", account.name),
            ));
        }
        if accounts
            .iter()
            .any(|o: &AccountSettings| o.phone_number_id == account.phone_number_id)
        {
            return Err(at(
                spanned.span(),
                format!("phone_number_id {} is used twice", account.phone_number_id),
            ));
        }
        if account.default && accounts.iter().any(|o: &AccountSettings| o.default) {
            return Err(at(
                spanned.span(),
                format!(
                    "account {:?}: only one account may be the default",
                    account.name
                ),
            ));
        }
        accounts.push(account);
    }
    if !accounts.is_empty() && !accounts.iter().any(|a| a.default) {
        accounts[0].default = true;
    }
    if accounts.len() > crate::state::MAX_ACCOUNTS {
        return Err(ConfigError::Invalid {
            file: name,
            message: format!(
                "{} accounts configured; at most {} are supported",
                accounts.len(),
                crate::state::MAX_ACCOUNTS
            ),
        });
    }
    let sandbox = !accounts.iter().any(|a| a.access_token.is_some());

    let meta_in = parsed.meta.unwrap_or_default();
    let api_in = parsed.api.unwrap_or_default();
    let sender_in = parsed.sender.unwrap_or_default();
    let sandbox_in = parsed.sandbox.unwrap_or_default();
    let secrets =
        |list: Option<Spanned<EnvStrings>>, key: &str| -> Result<Vec<Secret>, ConfigError> {
            let Some(list) = list else {
                return Ok(Vec::new());
            };
            let span = list.span();
            let values = list.into_inner().0;
            if values.is_empty() || values.iter().any(String::is_empty) {
                return Err(empty(span, key));
            }
            Ok(values.into_iter().map(Secret::new).collect())
        };
    let mut app_secrets = secrets(meta_in.app_secret, "[meta] app_secret")?;
    let mut keys = secrets(api_in.keys, "[api] keys")?;
    let mut verify_token = match meta_in.verify_token {
        Some(t) if t.get_ref().0.is_empty() => {
            return Err(empty(t.span(), "[meta] verify_token"));
        }
        Some(t) => Some(t.into_inner().0),
        None => None,
    };
    // The public sandbox credentials: with no file, or a file that asks.
    let public_allowed = !file_given || sandbox_in.public_credentials;
    if sandbox_in.public_credentials && !sandbox {
        return Err(ConfigError::Invalid {
            file: name,
            message: "[sandbox] public_credentials = true, but an account has an access_token (live mode): live mode never uses the public credentials".into(),
        });
    }
    let mut public_credentials = false;
    if sandbox && public_allowed {
        if app_secrets.is_empty() {
            app_secrets.push(Secret::new(SANDBOX_SECRET));
            public_credentials = true;
        }
        if verify_token.is_none() {
            verify_token = Some(SANDBOX_SECRET.to_string());
            public_credentials = true;
        }
        if keys.is_empty() {
            keys.push(Secret::new(SANDBOX_SECRET));
            public_credentials = true;
        }
    } else {
        let mut missing = Vec::new();
        if app_secrets.is_empty() {
            missing.push("[meta] app_secret");
        }
        if verify_token.is_none() {
            missing.push("[meta] verify_token");
        }
        if keys.is_empty() {
            missing.push("[api] keys (at least one)");
        }
        if !missing.is_empty() {
            let message = if sandbox {
                format!(
                    "no account has an access_token (sandbox mode), and a configuration file does not get the public sandbox credentials unless it says [sandbox] public_credentials = true; otherwise it needs {}",
                    missing.join(", ")
                )
            } else {
                format!(
                    "live mode (an account has an access_token) needs {}",
                    missing.join(", ")
                )
            };
            return Err(ConfigError::Invalid {
                file: name,
                message,
            });
        }
    }

    let graph_url = meta_in
        .graph_url
        .map(|u| u.0)
        .unwrap_or_else(|| "https://graph.facebook.com".into())
        .trim_end_matches('/')
        .to_string();
    if !(graph_url.starts_with("http://") || graph_url.starts_with("https://")) {
        return Err(ConfigError::Invalid {
            file: name,
            message: format!("[meta] graph_url {graph_url:?} must start with http:// or https://"),
        });
    }

    let rate = api_in.rate.unwrap_or(50);
    let burst = api_in.burst.unwrap_or(150);
    if rate == 0 || burst == 0 {
        return Err(ConfigError::Invalid {
            file: name,
            message: "[api] rate and burst must be at least 1".into(),
        });
    }
    let max_attempts = sender_in.max_attempts.unwrap_or(5);
    if max_attempts == 0 {
        return Err(ConfigError::Invalid {
            file: name,
            message: "[sender] max_attempts must be at least 1".into(),
        });
    }

    let mut targets = Vec::new();
    for (target_name, spanned) in &parsed.targets {
        let t = spanned.get_ref();
        if !(t.url.0.starts_with("http://") || t.url.0.starts_with("https://")) {
            return Err(at(
                spanned.span(),
                format!("target {target_name:?}: url must start with http:// or https://"),
            ));
        }
        let events = t
            .events
            .clone()
            .unwrap_or_else(|| vec!["message".into(), "status".into()]);
        if let Some(bad) = events
            .iter()
            .find(|e| !["message", "status", "account"].contains(&e.as_str()))
        {
            return Err(at(
                spanned.span(),
                format!(
                    "target {target_name:?}: unknown event {bad:?} (use \"message\", \"status\" and/or \"account\")"
                ),
            ));
        }
        if t.secret.get_ref().0.is_empty() {
            return Err(empty(
                t.secret.span(),
                &format!("target {target_name:?}: secret"),
            ));
        }
        targets.push(TargetSettings {
            name: target_name.clone(),
            url: t.url.0.clone(),
            secret: Secret::new(t.secret.get_ref().0.clone()),
            messages: events.iter().any(|e| e == "message"),
            statuses: events.iter().any(|e| e == "status"),
            account: events.iter().any(|e| e == "account"),
            max_backlog_bytes: t.max_backlog.map_or(64 * 1024 * 1024, |s| s.0),
        });
    }

    let ops_key = match parsed.ops.and_then(|o| o.key) {
        Some(k) if k.get_ref().0.is_empty() => return Err(empty(k.span(), "[ops] key")),
        Some(k) => Some(Secret::new(k.into_inner().0)),
        None => None,
    };
    let http_in = parsed.http.unwrap_or_default();
    let max_body = meta_in.max_body.map_or(3 * 1024 * 1024, |s| s.0);
    let http = HttpSettings {
        body_timeout: http_in
            .body_timeout
            .map_or(Duration::from_secs(10), |d| d.0),
        max_buffered: http_in.max_buffered.map_or(64 * 1024 * 1024, |s| s.0),
        max_connections: http_in.max_connections.unwrap_or(10_000),
        max_backlog: http_in.max_backlog.unwrap_or(DEFAULT_MAX_BACKLOG).max(1),
    };
    if http.body_timeout.is_zero() || http.max_connections == 0 {
        return Err(ConfigError::Invalid {
            file: name,
            message: "[http] body_timeout and max_connections must be above 0".into(),
        });
    }
    if http.max_buffered < max_body.max(crate::body::API_MAX_BODY) {
        return Err(ConfigError::Invalid {
            file: name,
            message: format!(
                "[http] max_buffered ({} bytes) must be at least the largest body accepted ([meta] max_body, {} bytes)",
                http.max_buffered,
                max_body.max(crate::body::API_MAX_BODY)
            ),
        });
    }

    let cluster = match &parsed.cluster {
        None => None,
        Some(c) => Some(cluster_settings(c.get_ref(), &at)?),
    };

    let data_dir = parsed.data_dir.map_or_else(|| "data".to_string(), |d| d.0);
    Ok(Settings {
        listen: parsed
            .listen
            .map_or_else(|| "127.0.0.1:8080".to_string(), |l| l.0),
        routes_path: relative(
            parsed
                .routes
                .map_or_else(|| "routes.toml".to_string(), |r| r.0),
        ),
        data_dir: if data_dir.is_empty() {
            None
        } else {
            Some(relative(data_dir))
        },
        retention: parsed
            .retention
            .map_or(Duration::from_secs(30 * 86400), |d| d.0),
        meta: MetaSettings {
            app_secrets,
            verify_token: Secret::new(verify_token.unwrap_or_default()),
            graph_url,
            graph_version: meta_in
                .graph_version
                .map_or_else(|| "v25.0".to_string(), |v| v.0),
            graph_http: meta_in.graph_http.unwrap_or_default(),
            max_body,
        },
        accounts,
        api: ApiSettings { keys, rate, burst },
        sender: SenderSettings {
            max_attempts,
            backoff: sender_in.backoff.map_or(Duration::from_secs(1), |d| d.0),
            timeout: sender_in.timeout.map_or(Duration::from_secs(10), |d| d.0),
            validity: sender_in
                .validity
                .map_or(Duration::from_secs(36 * 3600), |d| d.0),
        },
        conversations: ConversationSettings {
            handoff_ttl: parsed
                .conversations
                .and_then(|c| c.handoff_ttl)
                .map_or(Duration::from_secs(24 * 3600), |d| d.0),
        },
        targets,
        http,
        ops_key,
        sandbox,
        public_credentials,
        sandbox_allow_remote: sandbox_in.allow_remote,
        source: if !file_given {
            None
        } else {
            Some(file.to_path_buf())
        },
        cluster,
    })
}

fn cluster_settings(
    c: &ClusterIn,
    at: &dyn Fn(std::ops::Range<usize>, String) -> ConfigError,
) -> Result<ClusterSettings, ConfigError> {
    let url = &c.redis_url.get_ref().0;
    if !(["redis://", "rediss://", "unix://", "redis+unix://"]
        .iter()
        .any(|s| url.starts_with(s)))
    {
        return Err(at(
            c.redis_url.span(),
            "[cluster] redis_url must start with redis://, rediss://, unix:// or redis+unix://"
                .into(),
        ));
    }
    let node_id = match &c.node_id {
        Some(n) if n.get_ref().0.trim().is_empty() => {
            return Err(at(n.span(), "[cluster] node_id is empty".into()));
        }
        Some(n) => n.get_ref().0.clone(),
        None => default_node_id(),
    };
    let lease_ttl = c
        .lease_ttl
        .as_ref()
        .map_or(Duration::from_secs(5), |d| d.get_ref().0);
    if let Some(d) = &c.lease_ttl
        && !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&lease_ttl)
    {
        return Err(at(
            d.span(),
            "[cluster] lease_ttl must be between 1s and 60s".into(),
        ));
    }
    let snapshot_after = match &c.snapshot_after {
        Some(n) if n.get_ref().0 < 1024 => {
            return Err(at(
                n.span(),
                "[cluster] snapshot_after must be at least 1KB".into(),
            ));
        }
        Some(n) => n.get_ref().0,
        None => 64 * 1024 * 1024,
    };
    Ok(ClusterSettings {
        snapshot_after,
        redis_url: Secret::new(url.clone()),
        node_id,
        prefix: c
            .prefix
            .as_ref()
            .map_or_else(|| "wa-router:".to_string(), |p| p.0.clone()),
        lease_ttl,
    })
}

/// hostname-pid: unique on one machine and across machines.
fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "router".into());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Settings, ConfigError> {
        from_str(text, Path::new("/etc/wa/wa-router.toml"))
    }

    #[test]
    fn embedded_defaults_are_sandbox() {
        let s = from_str("", Path::new(EMBEDDED)).unwrap();
        assert!(s.public_credentials && s.source.is_none());
        assert!(s.sandbox);
        assert_eq!(s.listen, "127.0.0.1:8080");
        assert_eq!(s.meta.app_secrets[0].expose(), "sandbox");
        assert_eq!(s.api.keys[0].expose(), "sandbox");
        assert_eq!(s.meta.max_body, 3 * 1024 * 1024);
        assert_eq!(s.routes_path, PathBuf::from("routes.toml"));
    }

    #[test]
    fn env_interpolation_expands_and_names_missing_vars() {
        let env = |n: &str| (n == "TOKEN").then(|| "abc".to_string());
        assert_eq!(expand_env("Bearer ${TOKEN}!", env).unwrap(), "Bearer abc!");
        assert_eq!(expand_env("plain", env).unwrap(), "plain");
        let err = expand_env("${NOPE}", env).unwrap_err();
        assert!(err.contains("NOPE"), "{err}");
        assert!(expand_env("${TOKEN", env).is_err());
    }

    #[test]
    fn unset_variable_is_located() {
        let err = parse(
            "listen = \"127.0.0.1:1\"\n[meta]\napp_secret = \"${WA_ROUTER_SURELY_UNSET_VAR}\"\n",
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("/etc/wa/wa-router.toml:3:"), "{text}");
        assert!(text.contains("WA_ROUTER_SURELY_UNSET_VAR"), "{text}");
    }

    #[test]
    fn max_in_flight_defaults_to_half_a_second_of_the_rate_meta_may_raise() {
        let account = |extra: &str| {
            let text = format!(
                "[sandbox]\npublic_credentials = true\n\
                 [[accounts]]\nname = \"a\"\nphone_number_id = \"1\"\n{extra}"
            );
            let s = parse(&text).unwrap();
            let a = &s.accounts[0];
            (
                a.rate_for(false),
                a.max_in_flight_for(false),
                a.max_in_flight_for(true),
            )
        };
        // Unset, Meta's upgrade raises the rate and with it max_in_flight.
        assert_eq!(account(""), (80, 64, 500));
        // A rate set in the file stays as set.
        assert_eq!(account("rate = 1000\n"), (1000, 500, 500));
        assert_eq!(account("rate = 200\n"), (200, 100, 100));
        assert_eq!(account("rate = 1000\nmax_in_flight = 8\n"), (1000, 8, 8));
    }

    #[test]
    fn unknown_keys_are_errors_with_line_and_column() {
        let err = parse("listen = \"127.0.0.1:1\"\n\n[sender]\nmax_atempts = 3\n").unwrap_err();
        let text = err.to_string();
        assert!(text.starts_with("/etc/wa/wa-router.toml:4:1:"), "{text}");
        assert!(text.contains("max_atempts"), "{text}");
    }

    #[test]
    fn graph_http_is_1_1_or_2() {
        let open = "[sandbox]\npublic_credentials = true\n";
        let s = parse(&format!("{open}[meta]\ngraph_http = \"2\"\n")).unwrap();
        assert_eq!(s.meta.graph_http, GraphHttp::Http2);
        assert_eq!(parse(open).unwrap().meta.graph_http, GraphHttp::Http1);
        let text = parse("[meta]\ngraph_http = \"3\"\n")
            .unwrap_err()
            .to_string();
        assert!(text.starts_with("/etc/wa/wa-router.toml:2:14:"), "{text}");
        assert!(text.contains("1.1") && text.contains('2'), "{text}");
    }

    #[test]
    fn live_mode_requires_secrets() {
        let err =
            parse("[[accounts]]\nname = \"main\"\nphone_number_id = \"1\"\naccess_token = \"t\"\n")
                .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("app_secret") && text.contains("verify_token") && text.contains("keys"),
            "{text}"
        );
    }

    #[test]
    fn live_config_parses_durations_and_secret_lists() {
        let s = parse(
            r#"
data_dir = ""
[meta]
app_secret = ["old", "new"]
verify_token = "vt"
[[accounts]]
name = "main"
phone_number_id = "106540352242922"
access_token = "tok"
pace = "200ms"
[api]
keys = ["k"]
[sender]
backoff = "100ms"
"#,
        )
        .unwrap();
        assert!(!s.sandbox);
        assert!(s.data_dir.is_none());
        assert_eq!(s.meta.app_secrets.len(), 2);
        assert_eq!(s.accounts[0].pace, Duration::from_millis(200));
        assert_eq!(s.accounts[0].rate_for(false), 80);
        assert_eq!(s.accounts[0].max_in_flight_for(false), 64);
        assert!(s.accounts[0].default);
        assert_eq!(s.sender.backoff, Duration::from_millis(100));
        assert!(
            !format!("{s:?}").contains("tok\""),
            "secrets must not show in Debug"
        );
    }

    /// Issue #7.3: `${VAR}` with VAR set to "" must never mean "sandbox".
    #[test]
    fn empty_secrets_are_errors_naming_the_key() {
        let live = "[[accounts]]\nname = \"main\"\nphone_number_id = \"1\"\naccess_token = \"t\"\n[meta]\napp_secret = \"s\"\nverify_token = \"v\"\n[api]\nkeys = [\"k\"]\n";
        for (from, to, key, line) in [
            (
                "access_token = \"t\"",
                "access_token = \"\"",
                "access_token",
                4,
            ),
            (
                "app_secret = \"s\"",
                "app_secret = \"\"",
                "[meta] app_secret",
                6,
            ),
            (
                "app_secret = \"s\"",
                "app_secret = [\"s\", \"\"]",
                "[meta] app_secret",
                6,
            ),
            (
                "verify_token = \"v\"",
                "verify_token = \"\"",
                "[meta] verify_token",
                7,
            ),
            ("keys = [\"k\"]", "keys = [\"\"]", "[api] keys", 9),
        ] {
            let text = live.replace(from, to);
            let err = parse(&text).unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("/etc/wa/wa-router.toml:{line}:"))
                    && err.contains(key)
                    && err.contains("empty"),
                "{to}: {err}"
            );
        }
        let err = parse(&format!(
            "{live}[targets.a]\nurl = \"http://x\"\nsecret = \"\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("secret") && err.contains("empty"), "{err}");
    }

    #[test]
    fn a_file_gets_the_public_sandbox_credentials_only_when_it_asks() {
        let err = parse("data_dir = \"\"\n").unwrap_err().to_string();
        assert!(err.contains("public_credentials"), "{err}");
        let s = parse("[sandbox]\npublic_credentials = true\n").unwrap();
        assert!(s.sandbox && s.public_credentials);
        assert_eq!(s.api.keys[0].expose(), "sandbox");
        // Own secrets: sandbox mode without public credentials.
        let s = parse("[meta]\napp_secret = \"a\"\nverify_token = \"b\"\n[api]\nkeys = \"c\"\n")
            .unwrap();
        assert!(s.sandbox && !s.public_credentials);
        let err = parse("[sandbox]\npublic_credentials = true\n[[accounts]]\nname = \"m\"\nphone_number_id = \"1\"\naccess_token = \"t\"\n[meta]\napp_secret = \"s\"\nverify_token = \"v\"\n[api]\nkeys = \"k\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("live mode"), "{err}");
    }

    #[test]
    fn public_sandbox_listens_on_loopback_unless_allowed() {
        let none = Overrides::default();
        let remote = Overrides {
            listen: Some("0.0.0.0:8080".into()),
            ..Overrides::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("wa-router.toml");
        std::fs::write(&file, "[sandbox]\npublic_credentials = true\n").unwrap();
        assert!(load(Some(&file), &none).is_ok());
        let err = load(Some(&file), &remote).unwrap_err().to_string();
        assert!(
            err.contains("0.0.0.0:8080") && err.contains("allow_remote"),
            "{err}"
        );
        let allowed = Overrides {
            allow_remote_sandbox: true,
            ..remote.clone()
        };
        assert!(load(Some(&file), &allowed).is_ok());
        for (addr, loopback) in [
            ("127.0.0.1:1", true),
            ("localhost:8080", true),
            ("[::1]:80", true),
            ("0.0.0.0:80", false),
            ("[::]:80", false),
            ("192.168.1.2:80", false),
        ] {
            assert_eq!(is_loopback(addr), loopback, "{addr}");
        }
    }

    /// The shipped example configurations load (with their variables set).
    #[test]
    fn the_example_configurations_load() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
        let live = std::fs::read_to_string(root.join("wa-router.toml")).unwrap();
        let filled = regex::Regex::new(r"\$\{[A-Z_]+\}")
            .unwrap()
            .replace_all(&live, "value");
        let s = from_str(&filled, &root.join("wa-router.toml")).unwrap();
        assert!(!s.sandbox && s.ops_key.is_some());
        let sandbox_path = root.join("sandbox-agent").join("wa-router.toml");
        let sandbox = std::fs::read_to_string(&sandbox_path).unwrap();
        let s = from_str(&sandbox, &sandbox_path).unwrap();
        assert!(s.sandbox && s.public_credentials);
    }

    #[test]
    fn bad_duration_is_located() {
        let err = parse("[sender]\nbackoff = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/etc/wa/wa-router.toml:2:"), "{err}");
        assert!(err.contains("invalid duration"), "{err}");
    }

    #[test]
    fn cluster_settings_parse_with_defaults_and_located_errors() {
        let s = parse_sandbox("[cluster]\nredis_url = \"redis://:pw@10.0.0.5:6379/0\"\n").unwrap();
        let c = s.cluster.expect("a cluster");
        assert_eq!(c.prefix, "wa-router:");
        assert_eq!(c.lease_ttl, Duration::from_secs(5));
        assert_eq!(c.snapshot_after, 64 << 20);
        assert!(c.node_id.ends_with(&format!("-{}", std::process::id())));
        assert!(!format!("{c:?}").contains("pw@"), "the URL is a secret");
        let s = parse_sandbox(
            "[cluster]\nredis_url = \"unix:///run/redis.sock\"\nnode_id = \"r1\"\nprefix = \"x:\"\nlease_ttl = \"2s\"\nsnapshot_after = \"8KB\"\n",
        )
        .unwrap();
        let c = s.cluster.unwrap();
        assert_eq!((c.node_id.as_str(), c.prefix.as_str()), ("r1", "x:"));
        for (bad, want) in [
            ("redis_url = \"http://x\"", "must start with redis://"),
            (
                "redis_url = \"redis://x\"\nlease_ttl = \"2m\"",
                "between 1s and 60s",
            ),
            (
                "redis_url = \"redis://x\"\nnode_id = \" \"",
                "node_id is empty",
            ),
            (
                "redis_url = \"redis://x\"\nsnapshot_after = \"100B\"",
                "at least 1KB",
            ),
            ("redis_url = \"redis://x\"\nshards = 3", "unknown field"),
        ] {
            let err = parse_sandbox(&format!("[cluster]\n{bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("/etc/wa/wa-router.toml:"), "{err}");
            assert!(err.contains(want), "{err}");
        }
        assert!(parse_sandbox("").unwrap().cluster.is_none());
    }

    fn parse_sandbox(text: &str) -> Result<Settings, ConfigError> {
        parse(&format!("[sandbox]\npublic_credentials = true\n{text}"))
    }
}
