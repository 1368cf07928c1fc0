//! `spawn_app()` and the verbs tests use.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use wa_router::app::App;
use wiremock::matchers::{method, path_regex};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

pub const APP_SECRET: &str = "test-app-secret";
pub const VERIFY_TOKEN: &str = "test-verify-token";
pub const API_KEY: &str = "test-api-key";
pub const TOKEN: &str = "EAAG-test-token";
pub const PNID: &str = "106540352242922";
pub const ANA: &str = "16315551181";
pub const BOB: &str = "16315551182";

/// `hi` sets the state `greeted`; `again` is answered only in that state.
pub const STATEFUL: &str = r#"
[[rule]]
name = "greet"
when = { text = "hi" }
set_state = "greeted"
[[rule.send]]
type = "text"
body = "Hello"

[[rule]]
name = "again"
when = { text = "again", state = "greeted" }
[[rule.send]]
type = "text"
body = "Welcome back"
"#;

pub const GREETING: &str = r#"
[[rule]]
name = "greet"
when = { text = ["hi", "hello", "menu"] }
[[rule.send]]
type = "buttons"
body = "Hi {{ contact.name }}! How can we help?"
buttons = [ { id = "sales", title = "Talk to sales" }, { id = "support", title = "Support" } ]
"#;

/// Answers Graph sends with `wamid.mock.N` and mark-as-read with success.
pub struct GraphOk {
    n: AtomicUsize,
    arrivals: Arrivals,
}

/// Successful Graph sends with their arrival time.
pub type Arrivals = Arc<std::sync::Mutex<Vec<(Instant, Value)>>>;

impl GraphOk {
    pub fn new(n: AtomicUsize, arrivals: Arrivals) -> Self {
        GraphOk { n, arrivals }
    }
}

impl Respond for GraphOk {
    fn respond(&self, req: &Request) -> ResponseTemplate {
        let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        if body.get("status").is_some() {
            return ResponseTemplate::new(200).set_body_json(json!({ "success": true }));
        }
        self.arrivals
            .lock()
            .unwrap()
            .push((Instant::now(), body.clone()));
        let n = self.n.fetch_add(1, Ordering::SeqCst) + 1;
        ResponseTemplate::new(200).set_body_json(json!({
            "messaging_product": "whatsapp",
            "contacts": [{ "input": body["to"], "wa_id": body["to"] }],
            "messages": [{ "id": format!("wamid.mock.{n}") }]
        }))
    }
}

/// A Graph error answer as Meta sends it.
pub fn graph_error(http: u16, code: i64) -> ResponseTemplate {
    ResponseTemplate::new(http).set_body_json(json!({
        "error": { "message": format!("(#{code}) test error"), "type": "OAuthException", "code": code,
                   "error_data": { "messaging_product": "whatsapp", "details": "test" }, "fbtrace_id": "Atest" }
    }))
}

pub struct TestApp {
    pub addr: String,
    pub graph: MockServer,
    pub http: reqwest::Client,
    /// Holds the config and rule files for the app's lifetime.
    pub _dir: tempfile::TempDir,
    pub routes_path: PathBuf,
    pub arrivals: Arrivals,
    /// Mock event targets by name (each answers 200 unless told otherwise).
    pub targets: std::collections::HashMap<&'static str, MockServer>,
    /// The running app's state (for barriers; assertions go through HTTP).
    pub shared: Arc<wa_router::app::Shared>,
}

pub const TARGET_SECRET: &str = "test-target-secret";

/// Options for [`spawn_with`].
pub struct Options {
    pub routes: String,
    /// Extra TOML appended to the generated config (tables after the accounts).
    pub extra: String,
    pub pace: &'static str,
    pub account_extra: String,
    pub live: bool,
    pub rate: u32,
    pub burst: u32,
    /// Event targets: (name, events list as TOML, e.g. `["message"]`).
    pub targets: Vec<(&'static str, &'static str)>,
    /// Point the router at this Graph URL instead of the mock.
    pub graph_url: Option<String>,
    /// Extra TOML in the `[meta]` table.
    pub meta_extra: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            routes: GREETING.into(),
            extra: String::new(),
            pace: "50ms",
            account_extra: String::new(),
            live: true,
            rate: 1000,
            burst: 1000,
            targets: Vec::new(),
            graph_url: None,
            meta_extra: String::new(),
        }
    }
}

pub async fn spawn_app(routes: &str) -> TestApp {
    spawn_with(Options {
        routes: routes.into(),
        ..Options::default()
    })
    .await
}

pub async fn spawn_with(opts: Options) -> TestApp {
    if std::env::var_os("TEST_LOG").is_some() {
        wa_router::telemetry::init(wa_router::telemetry::LogFormat::Text);
    }
    let graph = MockServer::start().await;
    let arrivals = Arrivals::default();
    Mock::given(method("POST"))
        .and(path_regex(r"^/v25\.0/\d+/messages$"))
        .respond_with(GraphOk {
            n: AtomicUsize::new(0),
            arrivals: arrivals.clone(),
        })
        .with_priority(10)
        .mount(&graph)
        .await;
    let dir = tempfile::tempdir().expect("temp dir");
    let routes_path = dir.path().join("routes.toml");
    std::fs::write(&routes_path, &opts.routes).expect("write routes");
    let token = if opts.live {
        format!("access_token = \"{TOKEN}\"\n")
    } else {
        String::new()
    };
    let config = format!(
        r#"
listen = "127.0.0.1:0"
routes = "routes.toml"
data_dir = ""
[meta]
app_secret = ["old-secret", "{APP_SECRET}"]
verify_token = "{VERIFY_TOKEN}"
graph_url = "{graph}"
graph_version = "v25.0"
{meta_extra}
[[accounts]]
name = "main"
phone_number_id = "{PNID}"
{token}pace = "{pace}"
{account_extra}
[api]
keys = ["{API_KEY}"]
rate = {rate}
burst = {burst}
[sender]
max_attempts = 4
backoff = "20ms"
timeout = "2s"
{extra}
"#,
        graph = opts.graph_url.clone().unwrap_or_else(|| graph.uri()),
        pace = opts.pace,
        meta_extra = opts.meta_extra,
        account_extra = opts.account_extra,
        extra = opts.extra,
        rate = opts.rate,
        burst = opts.burst,
    );
    let mut targets = std::collections::HashMap::new();
    let mut target_toml = String::new();
    for (name, events) in &opts.targets {
        let mock = MockServer::start().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200))
            .with_priority(10)
            .mount(&mock)
            .await;
        target_toml.push_str(&format!("\n[targets.{name}]\nurl = \"{}/events/{name}\"\nsecret = \"{TARGET_SECRET}\"\nevents = {events}\n", mock.uri()));
        targets.insert(*name, mock);
    }
    let config = format!("{config}{target_toml}");
    let config_path = dir.path().join("wa-router.toml");
    std::fs::write(&config_path, &config).expect("write config");
    let settings =
        wa_router::config::from_str(&config, &config_path).expect("test config is valid");
    let app = App::build(settings).await.expect("app builds");
    let addr = format!("http://127.0.0.1:{}", app.port());
    let shared = app.spawn();
    TestApp {
        shared,
        addr,
        graph,
        http: reqwest::Client::new(),
        _dir: dir,
        routes_path,
        arrivals,
        targets,
    }
}

/// The port a router child process bound (it listens on port 0 and logs
/// `wa-router listening … port=N`): read from its log file at `log`.
/// No port is picked beforehand, so no other process can take it first.
pub async fn port_from_log(log: &std::path::Path) -> u16 {
    let re = regex::Regex::new(r#"wa-router listening.*?port(?:=|":)(\d+)"#).unwrap();
    wait_for(20, "the router to log its port", || async {
        let text = std::fs::read_to_string(log).ok()?;
        re.captures(&text)?.get(1)?.as_str().parse().ok()
    })
    .await
}

/// Poll `f` every 25 ms until it returns `Some`, for at most `secs` seconds.
pub async fn wait_for<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

pub fn sign(body: &[u8], secret: &str) -> String {
    wa_router::crypto::sign(secret.as_bytes(), body)
}

pub fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

static WAMIDS: AtomicUsize = AtomicUsize::new(1);

pub fn new_wamid() -> String {
    format!(
        "wamid.test.{}.{}",
        std::process::id(),
        WAMIDS.fetch_add(1, Ordering::SeqCst)
    )
}

/// An inbound message of `kind` with `content` from `from`.
pub fn message(from: &str, kind: &str, content: Value) -> Value {
    let mut m =
        json!({ "from": from, "id": new_wamid(), "timestamp": now_s().to_string(), "type": kind });
    m[kind] = content;
    m
}

pub fn text(from: &str, body: &str) -> Value {
    message(from, "text", json!({ "body": body }))
}

pub fn button(from: &str, id: &str, title: &str) -> Value {
    message(
        from,
        "interactive",
        json!({ "type": "button_reply", "button_reply": { "id": id, "title": title } }),
    )
}

pub fn list_reply(from: &str, id: &str, title: &str) -> Value {
    message(
        from,
        "interactive",
        json!({ "type": "list_reply", "list_reply": { "id": id, "title": title } }),
    )
}

pub fn name_of(wa_id: &str) -> &'static str {
    match wa_id {
        ANA => "Ana",
        BOB => "Bob",
        _ => "Someone",
    }
}

/// A notification carrying `messages` (and their senders as contacts).
pub fn notification(messages: Vec<Value>, statuses: Vec<Value>) -> Value {
    let mut senders: Vec<String> = messages
        .iter()
        .filter_map(|m| m["from"].as_str().map(str::to_string))
        .collect();
    senders.dedup();
    let contacts: Vec<Value> = senders
        .iter()
        .map(|w| json!({ "profile": { "name": name_of(w) }, "wa_id": w }))
        .collect();
    let mut value = json!({ "messaging_product": "whatsapp", "metadata": { "display_phone_number": "15550783881", "phone_number_id": PNID } });
    if !contacts.is_empty() {
        value["contacts"] = json!(contacts);
    }
    if !messages.is_empty() {
        value["messages"] = json!(messages);
    }
    if !statuses.is_empty() {
        value["statuses"] = json!(statuses);
    }
    json!({ "object": "whatsapp_business_account", "entry": [{ "id": "310298475561023", "changes": [{ "field": "messages", "value": value }] }] })
}

/// The value of the Prometheus line that starts with `line_start` (a
/// metric name, with its labels if any) followed by a space.
pub fn metric_value(text: &str, line_start: &str) -> Option<f64> {
    text.lines()
        .find(|l| {
            l.strip_prefix(line_start)
                .is_some_and(|rest| rest.starts_with(' '))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

pub fn status(wamid: &str, status: &str, to: &str) -> Value {
    json!({ "id": wamid, "status": status, "timestamp": now_s().to_string(), "recipient_id": to })
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.addr, path)
    }

    /// `GET /metrics` as text (no ops key configured in tests).
    pub async fn metrics_text(&self) -> String {
        let resp = self.http.get(self.url("/metrics")).send().await.unwrap();
        resp.text().await.unwrap()
    }

    /// `GET /healthz` as JSON.
    pub async fn healthz(&self) -> Value {
        let resp = self.http.get(self.url("/healthz")).send().await.unwrap();
        resp.json().await.unwrap()
    }

    /// POST /webhook with `body` signed with the app secret.
    pub async fn post_webhook(&self, body: &[u8]) -> reqwest::Response {
        self.post_webhook_signed(body, Some(sign(body, APP_SECRET)))
            .await
    }

    pub async fn post_webhook_signed(
        &self,
        body: &[u8],
        signature: Option<String>,
    ) -> reqwest::Response {
        let mut req = self
            .http
            .post(self.url("/webhook"))
            .header("content-type", "application/json")
            .body(body.to_vec());
        if let Some(s) = signature {
            req = req.header("X-Hub-Signature-256", s);
        }
        req.send().await.expect("POST /webhook")
    }

    /// Deliver one notification; expects 200.
    pub async fn deliver(&self, notification: &Value) {
        let resp = self
            .post_webhook(&serde_json::to_vec(notification).unwrap())
            .await;
        assert_eq!(
            resp.status(),
            200,
            "signed webhook: {}",
            resp.text().await.unwrap_or_default()
        );
    }

    /// Deliver one inbound message; returns its wamid.
    pub async fn inbound(&self, msg: Value) -> String {
        let id = msg["id"].as_str().unwrap().to_string();
        self.deliver(&notification(vec![msg], vec![])).await;
        id
    }

    pub async fn say(&self, from: &str, body: &str) -> String {
        self.inbound(text(from, body)).await
    }

    /// Call the agent API with the test key.
    pub async fn api(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, self.url(path))
            .header("X-API-Key", API_KEY);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("API call");
        let status = resp.status().as_u16();
        let json = resp.json().await.unwrap_or(Value::Null);
        (status, json)
    }

    pub async fn send(&self, body: Value) -> (u16, Value) {
        self.api(reqwest::Method::POST, "/v1/messages", Some(body))
            .await
    }

    pub async fn send_text(&self, to: &str, body: &str) -> (u16, Value) {
        self.send(json!({ "to": format!("+{to}"), "type": "text", "text": { "body": body } }))
            .await
    }

    pub async fn send_template(&self, to: &str, name: &str) -> (u16, Value) {
        self.send(json!({ "to": format!("+{to}"), "type": "template", "template": { "name": name, "language": { "code": "en_US" } } })).await
    }

    pub async fn record(&self, id: &str) -> Value {
        let (status, body) = self
            .api(reqwest::Method::GET, &format!("/v1/messages/{id}"), None)
            .await;
        assert_eq!(status, 200, "GET message {id}: {body}");
        body
    }

    pub async fn wait_status(&self, id: &str, want: &str) -> Value {
        wait_for(10, &format!("message {id} to be {want}"), || async {
            let r = self.record(id).await;
            (r["status"] == want).then_some(r)
        })
        .await
    }

    pub async fn conversation(&self, wa_id: &str) -> Option<Value> {
        let (status, body) = self
            .api(
                reqwest::Method::GET,
                &format!("/v1/conversations/main/{wa_id}"),
                None,
            )
            .await;
        (status == 200).then_some(body)
    }

    pub async fn open_window(&self, wa_id: &str) {
        self.say(wa_id, "window opener").await;
        wait_for(10, "the window to open", || async {
            self.conversation(wa_id)
                .await
                .filter(|c| c["window"]["open"] == true)
                .map(|_| ())
        })
        .await;
    }

    /// Every Graph message send received (bodies with a `to`), oldest first,
    /// failed ones included.
    pub async fn sends(&self) -> Vec<Value> {
        let reqs = self.graph.received_requests().await.unwrap_or_default();
        reqs.iter()
            .filter_map(|r| serde_json::from_slice::<Value>(&r.body).ok())
            .filter(|b| b.get("to").is_some())
            .collect()
    }

    /// Successful sends with their arrival times.
    pub fn arrivals(&self) -> Vec<(Instant, Value)> {
        self.arrivals.lock().unwrap().clone()
    }

    /// Human text of each send to `to`: text body, interactive body, template name.
    pub async fn texts_to(&self, to: &str) -> Vec<String> {
        self.sends()
            .await
            .iter()
            .filter(|b| b["to"] == to)
            .map(body_text)
            .collect()
    }

    pub async fn wait_texts(&self, to: &str, count: usize) -> Vec<String> {
        wait_for(10, &format!("{count} sends to {to}"), || async {
            let t = self.texts_to(to).await;
            (t.len() >= count).then_some(t)
        })
        .await
    }

    /// Barrier: every inbound message acknowledged so far has had its rules
    /// run (webhooks are answered before that).
    pub async fn rules_idle(&self) {
        wait_for(10, "the rule lanes to be idle", || async {
            (self.shared.lanes.pending() == 0).then_some(())
        })
        .await;
    }

    /// Barrier: the rules of every message acknowledged so far have run,
    /// and everything they queued on the account has left, when a template
    /// sent now reaches the Graph mock.
    pub async fn flush(&self) {
        self.rules_idle().await;
        let name = format!("flush_{}", WAMIDS.fetch_add(1, Ordering::SeqCst));
        let (status, _) = self.send_template("16315559999", &name).await;
        assert_eq!(status, 202);
        wait_for(10, "the flush template", || async {
            self.sends()
                .await
                .iter()
                .any(|b| b["template"]["name"] == name)
                .then_some(())
        })
        .await;
    }
}

pub fn body_text(b: &Value) -> String {
    let kind = b["type"].as_str().unwrap_or_default();
    let part = &b[kind];
    let t = match kind {
        "text" => &part["body"],
        "interactive" => &part["body"]["text"],
        "template" => &part["name"],
        _ => &part["caption"],
    };
    t.as_str().unwrap_or_default().to_string()
}

/// A request an event target received: headers of interest and the body.
#[derive(Debug, Clone)]
pub struct Delivered {
    pub signature: String,
    pub event_id: String,
    /// X-Router-Timestamp and X-Router-Timestamp-Signature.
    pub timestamp: String,
    pub timestamp_signature: String,
    pub raw: Vec<u8>,
    pub body: Value,
}

impl TestApp {
    /// Every POST the target `name` received, oldest first.
    pub async fn deliveries(&self, name: &str) -> Vec<Delivered> {
        let reqs = self.targets[name]
            .received_requests()
            .await
            .unwrap_or_default();
        let header = |r: &wiremock::Request, name: &str| {
            r.headers
                .get(name)
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default()
        };
        reqs.iter()
            .map(|r| Delivered {
                signature: header(r, "x-router-signature-256"),
                event_id: header(r, "x-router-event-id"),
                timestamp: header(r, "x-router-timestamp"),
                timestamp_signature: header(r, "x-router-timestamp-signature"),
                raw: r.body.clone(),
                body: serde_json::from_slice(&r.body).unwrap_or(Value::Null),
            })
            .collect()
    }

    /// Wait until target `name` received at least `count` events of `kind`.
    pub async fn wait_events(&self, name: &str, kind: &str, count: usize) -> Vec<Delivered> {
        wait_for(15, &format!("{count} {kind} events at {name}"), || async {
            let d: Vec<Delivered> = self
                .deliveries(name)
                .await
                .into_iter()
                .filter(|d| d.body["event"] == kind)
                .collect();
            (d.len() >= count).then_some(d)
        })
        .await
    }
}

/// A WABA-level notification of `field` with `value` (no phone number).
pub fn account_change(field: &str, value: Value) -> Value {
    json!({ "object": "whatsapp_business_account",
            "entry": [{ "id": "310298475561023", "time": now_s(),
                        "changes": [{ "field": field, "value": value }] }] })
}

/// Meta's announcement of a number's throughput upgrade, naming it by its
/// display number.
pub fn throughput_upgrade(display_phone_number: &str) -> Value {
    account_change(
        "phone_number_quality_update",
        json!({ "display_phone_number": display_phone_number, "event": "THROUGHPUT_UPGRADE",
                "max_daily_conversations_per_business": "TIER_UNLIMITED" }),
    )
}

/// A message from a contact known by BSUID `user_id` only (no phone
/// number), named Carol.
pub fn from_bsuid(user_id: &str, text: &str) -> Value {
    let mut n = notification(vec![], vec![]);
    let value = &mut n["entry"][0]["changes"][0]["value"];
    value["contacts"] = json!([{ "profile": { "name": "Carol" }, "user_id": user_id }]);
    value["messages"] = json!([{ "from_user_id": user_id, "id": new_wamid(),
                                 "timestamp": now_s().to_string(), "type": "text",
                                 "text": { "body": text } }]);
    n
}

/// Meta's `user_id_update` for the test number: BSUID `previous` is now
/// `current`.
pub fn user_id_update(previous: &str, current: &str) -> Value {
    let mut n = notification(vec![], vec![]);
    n["entry"][0]["changes"][0] = json!({ "field": "user_id_update", "value": {
        "messaging_product": "whatsapp",
        "metadata": { "display_phone_number": "15550783881", "phone_number_id": PNID },
        "user_id_update": [{ "detail": "user id changed",
                             "user_id": { "previous": previous, "current": current },
                             "timestamp": now_s().to_string() }] } });
    n
}
