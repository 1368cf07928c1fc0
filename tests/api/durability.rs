//! SPEC §9: with a data_dir, what was answered 200/202 survives a restart,
//! including SIGKILL. These tests run the real binary as a child process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicUsize;

use serde_json::{Value, json};
use wiremock::matchers::{method, path_regex};
use wiremock::{Mock, MockServer};

use crate::helpers::*;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_wa-router");

/// A router process on a data directory that outlives it.
pub(crate) struct Router {
    child: Option<Child>,
    dir: PathBuf,
    port: u16,
    http: reqwest::Client,
}

pub(crate) fn write_config(dir: &Path, graph: &str, pace: &str, routes: &str, extra: &str) {
    std::fs::write(dir.join("routes.toml"), routes).unwrap();
    std::fs::write(
        dir.join("wa-router.toml"),
        format!(
            r#"listen = "127.0.0.1:0"
routes = "routes.toml"
data_dir = "data"
[meta]
app_secret = "{APP_SECRET}"
verify_token = "{VERIFY_TOKEN}"
graph_url = "{graph}"
[[accounts]]
name = "main"
phone_number_id = "{PNID}"
access_token = "{TOKEN}"
pace = "{pace}"
rate = 1000
[api]
keys = ["{API_KEY}"]
rate = 1000
burst = 1000
[sender]
backoff = "20ms"
timeout = "2s"
{extra}
"#
        ),
    )
    .unwrap();
}

impl Router {
    async fn start(dir: &Path, graph: &str, pace: &str, routes: &str) -> Router {
        Self::start_with(dir, graph, pace, routes, "").await
    }

    async fn start_with(dir: &Path, graph: &str, pace: &str, routes: &str, extra: &str) -> Router {
        write_config(dir, graph, pace, routes, extra);
        Self::spawn(dir).await
    }

    /// Start the binary on `dir/wa-router.toml` (which listens on port 0)
    /// and wait until it is ready.
    pub(crate) async fn spawn(dir: &Path) -> Router {
        Self::spawn_env(dir, &[]).await
    }

    /// [`Router::spawn`] with these variables set in its environment.
    pub(crate) async fn spawn_env(dir: &Path, env: &[(&str, &str)]) -> Router {
        let log_path = dir.join("router.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(BIN)
            .args(["serve", "-c", "wa-router.toml"])
            .current_dir(dir)
            .env("RUST_LOG", "warn,wa_router::cli=info")
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut r = Router {
            child: Some(child),
            dir: dir.to_path_buf(),
            port: 0,
            http: reqwest::Client::new(),
        };
        r.port = port_from_log(&log_path).await;
        wait_for(20, "readyz", || async {
            let resp = r.http.get(r.url("/readyz")).send().await.ok()?;
            (resp.status() == 200).then_some(())
        })
        .await;
        r
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// SIGKILL: a crash.
    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM and wait for a clean exit.
    fn stop(&mut self) -> i32 {
        let c = self.child.take().unwrap();
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let out = c.wait_with_output().unwrap();
        out.status.code().unwrap_or(-1)
    }

    pub(crate) async fn api(
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
        let resp = req.send().await.unwrap();
        (
            resp.status().as_u16(),
            resp.json().await.unwrap_or(Value::Null),
        )
    }

    /// `GET /metrics` as text (`None` while it does not answer).
    async fn metrics_text(&self) -> Option<String> {
        let resp = self.http.get(self.url("/metrics")).send().await.ok()?;
        resp.text().await.ok()
    }

    pub(crate) async fn webhook(&self, n: &Value) -> u16 {
        let body = serde_json::to_vec(n).unwrap();
        let resp = self
            .http
            .post(self.url("/webhook"))
            .header("X-Hub-Signature-256", sign(&body, APP_SECRET))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        resp.status().as_u16()
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn graph_mock() -> (MockServer, Arrivals) {
    let graph = MockServer::start().await;
    let arrivals = Arrivals::default();
    Mock::given(method("POST"))
        .and(path_regex(r"^/v25\.0/\d+/messages$"))
        .respond_with(GraphOk::new(AtomicUsize::new(0), arrivals.clone()))
        .mount(&graph)
        .await;
    (graph, arrivals)
}

/// Every message of `ids` once it ended `sent` or `failed` (each must
/// still exist), waiting at most `secs`.
pub(crate) async fn settled(r: &Router, ids: &[String], secs: u64) -> Vec<Value> {
    wait_for(secs, "every message to end", || async {
        let mut out = Vec::new();
        for id in ids {
            let (status, rec) = r
                .api(reqwest::Method::GET, &format!("/v1/messages/{id}"), None)
                .await;
            // The API key's rate limit may answer a poll of many ids: ask
            // again once it has refilled (its Retry-After is a second at
            // least). Asking again at once, a fast router answered every
            // round's first few dozen polls and then 429: no round ever
            // saw all the ids.
            if status == 429 {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                return None;
            }
            assert_eq!(status, 200, "message {id} was lost");
            if rec["status"] != "sent" && rec["status"] != "failed" {
                return None;
            }
            out.push(rec);
        }
        Some(out)
    })
    .await
}

/// SPEC §9 after a crash: each message `t{i}` of `records` (in order) is
/// `sent` and reached the Graph API exactly once, or `failed` as
/// `interrupted` (a send under way: Meta may or may not have it) and
/// reached it at most once.
pub(crate) fn sent_once_or_interrupted(records: &[Value], sent: &[String]) {
    for (i, rec) in records.iter().enumerate() {
        let name = format!("t{i}");
        let times = sent.iter().filter(|n| **n == name).count();
        match rec["status"].as_str().unwrap() {
            "sent" => assert_eq!(times, 1, "{name} sent {times} times: {rec}"),
            _ => {
                assert_eq!(rec["error"]["code"], "interrupted", "{rec}");
                assert!(times <= 1, "{name} sent {times} times: {rec}");
            }
        }
    }
}

/// Template names the mock Graph API received, in order.
pub(crate) fn template_names(arrivals: &Arrivals) -> Vec<String> {
    arrivals
        .lock()
        .unwrap()
        .iter()
        .map(|(_, b)| b["template"]["name"].as_str().unwrap().to_string())
        .collect()
}

/// Templates `t0` … to ANA through the API: their ids, each accepted.
async fn accept_templates(r: &Router, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let (status, body) = r
            .api(
                reqwest::Method::POST,
                "/v1/messages",
                Some(template(&format!("t{i}"))),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        ids.push(body["id"].as_str().unwrap().to_string());
    }
    ids
}

fn template(name: &str) -> Value {
    json!({ "to": format!("+{ANA}"), "type": "template", "template": { "name": name, "language": { "code": "en" } } })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_accepted_before_a_sigkill_are_sent_once_or_end_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let (graph, arrivals) = graph_mock().await;
    let mut r = Router::start(dir.path(), &graph.uri(), "150ms", "").await;
    let ids = accept_templates(&r, 8).await;
    r.kill();
    let r = Router::start(dir.path(), &graph.uri(), "150ms", "").await;
    let finals = settled(&r, &ids, 20).await;
    let sent = template_names(&arrivals);
    sent_once_or_interrupted(&finals, &sent);
    let mut order = sent.clone();
    order.dedup();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted, "queues resume in acceptance order");
}

/// #9: with several sends in flight at a SIGKILL, each message still ends
/// sent once or recorded failed (`interrupted`), never sent twice; those
/// that waited behind their contact's first message are sent after the
/// restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_with_sends_in_flight_sends_each_at_most_once() {
    let dir = tempfile::tempdir().unwrap();
    let graph = MockServer::start().await;
    let arrivals = Arrivals::default();
    // Meta answers after 1.5 s (the timeout is 2 s): the first sends are
    // still in flight at the kill.
    Mock::given(method("POST"))
        .and(path_regex(r"^/v25\.0/\d+/messages$"))
        .respond_with(DelayedOk(
            GraphOk::new(AtomicUsize::new(0), arrivals.clone()),
            std::time::Duration::from_millis(1500),
        ))
        .mount(&graph)
        .await;
    let mut r = Router::start(dir.path(), &graph.uri(), "0ms", "").await;
    let to = |i: usize| format!("+1631555{i:04}");
    let mut queued = Vec::new();
    // Four contacts' first messages go out at once; each contact's second
    // waits for the first's answer.
    for round in 0..2 {
        for c in 0..4 {
            let name = format!("c{c}_{round}");
            let body = json!({ "to": to(c), "type": "template", "template": { "name": name, "language": { "code": "en" } } });
            let (status, rec) = r
                .api(reqwest::Method::POST, "/v1/messages", Some(body))
                .await;
            assert_eq!(status, 202, "{rec}");
            queued.push((rec["id"].as_str().unwrap().to_string(), name));
        }
    }
    wait_for(10, "four sends in flight", || async {
        (arrivals.lock().unwrap().len() >= 4).then_some(())
    })
    .await;
    r.kill();
    let in_flight: Vec<String> = arrivals
        .lock()
        .unwrap()
        .iter()
        .map(|(_, b)| b["template"]["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(in_flight.len(), 4, "pipelined: {in_flight:?}");
    assert!(
        in_flight.iter().all(|n| n.ends_with("_0")),
        "one per contact: {in_flight:?}"
    );
    let r = Router::start(dir.path(), &graph.uri(), "0ms", "").await;
    let ids: Vec<String> = queued.iter().map(|(id, _)| id.clone()).collect();
    let finals = settled(&r, &ids, 30).await;
    let sent = template_names(&arrivals);
    for ((_, name), rec) in queued.iter().zip(finals) {
        let times = sent.iter().filter(|n| *n == name).count();
        if in_flight.contains(name) {
            assert_eq!(rec["status"], "failed", "{rec}");
            assert_eq!(rec["error"]["code"], "interrupted", "{rec}");
            assert_eq!(times, 1, "{name} must not be sent again");
        } else {
            assert_eq!(rec["status"], "sent", "{rec}");
            assert_eq!(times, 1, "{name} sent {times} times");
        }
    }
}

/// A Graph answer after a delay.
struct DelayedOk(GraphOk, std::time::Duration);

impl wiremock::Respond for DelayedOk {
    fn respond(&self, req: &wiremock::Request) -> wiremock::ResponseTemplate {
        self.0.respond(req).set_delay(self.1)
    }
}

const BOOK: &str = r#"
[[rule]]
name = "book"
when = { text = "book" }
set_state = "party"
send = [ { type = "text", body = "How many?" } ]
"#;

/// Bytes of the files in `data` whose names `of` accepts.
fn bytes_of(data: &Path, of: fn(&str) -> bool) -> f64 {
    std::fs::read_dir(data)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| of(&e.file_name().to_string_lossy()))
        .map(|e| e.metadata().unwrap().len() as f64)
        .sum()
}

/// The journal's and the archive's bytes on `/metrics`, once they equal
/// what their files in `data` hold (the router is quiet).
async fn storage_as_on_disk(r: &Router, data: &Path) -> (f64, f64) {
    let journal = |n: &str| n == "snapshot.log" || (n.starts_with("wal-") && n.ends_with(".log"));
    let archive = |n: &str| n.starts_with("archive.sqlite3");
    wait_for(10, "the metrics to match the files", || async {
        let text = r.metrics_text().await?;
        let j = metric_value(&text, "wa_router_storage_bytes{store=\"journal\"}")?;
        let a = metric_value(&text, "wa_router_storage_bytes{store=\"archive\"}")?;
        (j == bytes_of(data, journal) && a == bytes_of(data, archive)).then_some((j, a))
    })
    .await
}

/// `/metrics` counts the journal's and the archive's bytes on disk: what
/// the files in the data directory hold once the router is quiet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_journal_and_the_archive_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (graph, arrivals) = graph_mock().await;
    let mut r = Router::start(dir.path(), &graph.uri(), "0s", GREETING).await;
    assert_eq!(
        r.webhook(&notification(vec![text(ANA, "hi")], vec![]))
            .await,
        200
    );
    wait_for(10, "the reply", || async {
        (!arrivals.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    let (j, a) = storage_as_on_disk(&r, &data).await;
    assert!(j > 0.0, "the acknowledged webhook is in the journal");
    assert!(a > 0.0, "the archive has its schema at least");
    // A clean stop writes the snapshot: counted with the logs after it.
    assert_eq!(r.stop(), 0);
    let r = Router::start(dir.path(), &graph.uri(), "0s", GREETING).await;
    assert!(data.join("snapshot.log").exists());
    let (j, _) = storage_as_on_disk(&r, &data).await;
    assert!(j > 0.0, "the snapshot holds the conversation");
}

/// `/metrics` counts the journal's fdatasyncs: an acknowledged webhook
/// waited for one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_journal_syncs_an_ack_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let (graph, _arrivals) = graph_mock().await;
    let r = Router::start(dir.path(), &graph.uri(), "0s", GREETING).await;
    let syncs = |text: String| metric_value(&text, "wa_router_journal_syncs_total");
    let before = syncs(r.metrics_text().await.unwrap()).expect("the counter is shown");
    assert_eq!(
        r.webhook(&notification(vec![text(ANA, "hi")], vec![]))
            .await,
        200
    );
    let after = syncs(r.metrics_text().await.unwrap()).unwrap();
    assert!(
        after > before,
        "the ack waited for a sync: {before} → {after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_effects_survive_a_sigkill_and_are_not_repeated() {
    let dir = tempfile::tempdir().unwrap();
    let (graph, arrivals) = graph_mock().await;
    let mut r = Router::start(dir.path(), &graph.uri(), "50ms", BOOK).await;
    let book = notification(vec![text(ANA, "book")], vec![]);
    let stop = notification(vec![text(BOB, "STOP")], vec![]);
    assert_eq!(r.webhook(&book).await, 200);
    assert_eq!(r.webhook(&stop).await, 200);
    r.kill();
    let r = Router::start(dir.path(), &graph.uri(), "50ms", BOOK).await;
    let conv = wait_for(10, "the restored conversation", || async {
        let (status, c) = r
            .api(
                reqwest::Method::GET,
                &format!("/v1/conversations/main/{ANA}"),
                None,
            )
            .await;
        (status == 200 && c["state"] == "party").then_some(c)
    })
    .await;
    assert_eq!(conv["window"]["open"], true);
    let (_, bob) = r
        .api(
            reqwest::Method::GET,
            &format!("/v1/conversations/main/{BOB}"),
            None,
        )
        .await;
    assert_eq!(bob["opted_out"], true);
    // Meta retries the same delivery: acknowledged, not run again.
    assert_eq!(r.webhook(&book).await, 200);
    // The reply leaves, or (the SIGKILL came while it was being sent) it
    // ended `failed`/`interrupted`: at most once, never resent.
    let sent = wait_for(10, "the reply", || async {
        if arrivals.lock().unwrap().iter().any(|(_, b)| b["to"] == ANA) {
            return Some(true);
        }
        let (_, list) = r
            .api(
                reqwest::Method::GET,
                &format!("/v1/messages?to={ANA}"),
                None,
            )
            .await;
        list["messages"]
            .as_array()?
            .iter()
            .any(|m| m["error"]["code"] == "interrupted")
            .then_some(false)
    })
    .await;
    // Barrier: a later message's reply arrives after any duplicate would have.
    assert_eq!(
        r.webhook(&notification(vec![text(BOB, "start")], vec![]),)
            .await,
        200
    );
    // Rules run after the ack: wait until the opt-in is in force.
    wait_for(10, "the opt-in", || async {
        let (_, c) = r
            .api(
                reqwest::Method::GET,
                &format!("/v1/conversations/main/{BOB}"),
                None,
            )
            .await;
        (c["opted_out"] == false).then_some(())
    })
    .await;
    let (s, _) = r.api(reqwest::Method::POST, "/v1/messages", Some(json!({ "to": format!("+{BOB}"), "type": "template", "template": { "name": "barrier", "language": { "code": "en" } } }))).await;
    assert_eq!(s, 202);
    wait_for(10, "the barrier", || async {
        arrivals
            .lock()
            .unwrap()
            .iter()
            .any(|(_, b)| b["template"]["name"] == "barrier")
            .then_some(())
    })
    .await;
    let replies = arrivals
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, b)| b["to"] == ANA)
        .count();
    let want = if sent { 1 } else { 0 };
    assert_eq!(replies, want, "one inbound message, at most one reply");
}

async fn queue_rate(r: &Router) -> Value {
    let (_, queues) = r.api(reqwest::Method::GET, "/v1/queues", None).await;
    queues["queues"][0]["rate"].clone()
}

/// Issue #9: what Meta told of the number (its display number, its
/// throughput upgrade) survives a SIGKILL and a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throughput_upgrade_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (graph, _arrivals) = graph_mock().await;
    let config = || {
        write_config(dir.path(), &graph.uri(), "50ms", "", "");
        // No `rate` of its own: the account follows Meta's.
        let file = dir.path().join("wa-router.toml");
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, text.replacen("rate = 1000\n", "", 1)).unwrap();
    };
    config();
    let mut r = Router::spawn(dir.path()).await;
    assert_eq!(queue_rate(&r).await, 80);
    assert_eq!(
        r.webhook(&notification(vec![text(ANA, "hi")], vec![]))
            .await,
        200
    );
    assert_eq!(r.webhook(&throughput_upgrade("15550783881")).await, 200);
    assert_eq!(queue_rate(&r).await, 1000);
    r.kill();
    // From the journal; then a clean stop writes a snapshot, read at the
    // next start.
    let mut r = Router::spawn(dir.path()).await;
    assert_eq!(queue_rate(&r).await, 1000);
    assert_eq!(r.stop(), 0);
    let r = Router::spawn(dir.path()).await;
    assert_eq!(queue_rate(&r).await, 1000);
}

/// A conversation's consent and whether its window is open.
async fn consent(r: &Router, wa_id: &str) -> (Value, Value) {
    let path = format!("/v1/conversations/main/{wa_id}");
    let (status, c) = r.api(reqwest::Method::GET, &path, None).await;
    assert_eq!(status, 200, "{c}");
    (c["opted_out"].clone(), c["window"]["open"].clone())
}

/// A contact's change of number (Meta's `system` `user_changed_number`)
/// survives a SIGKILL (replayed from the journal) and a snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_number_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (graph, _arrivals) = graph_mock().await;
    let new_number = "16315550147";
    let mut r = Router::start(dir.path(), &graph.uri(), "50ms", "").await;
    assert_eq!(
        r.webhook(&notification(vec![text(ANA, "hi")], vec![]))
            .await,
        200
    );
    let (status, _) = r
        .api(
            reqwest::Method::POST,
            &format!("/v1/conversations/main/{ANA}/opt-out"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    let change = message(
        ANA,
        "system",
        json!({ "body": "changed", "wa_id": new_number, "type": "user_changed_number" }),
    );
    assert_eq!(r.webhook(&notification(vec![change], vec![])).await, 200);
    let moved = (json!(true), json!(true));
    let left = (json!(false), json!(false));
    assert_eq!(consent(&r, new_number).await, moved);
    r.kill();
    let mut r = Router::spawn(dir.path()).await;
    assert_eq!(consent(&r, new_number).await, moved, "from the journal");
    assert_eq!(consent(&r, ANA).await, left);
    assert_eq!(r.stop(), 0);
    let r = Router::spawn(dir.path()).await;
    assert_eq!(consent(&r, new_number).await, moved, "from the snapshot");
    assert_eq!(consent(&r, ANA).await, left);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_exits_0_and_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let (graph, _) = graph_mock().await;
    let mut r = Router::start(dir.path(), &graph.uri(), "10s", "").await;
    let scheduled = json!({ "to": format!("+{ANA}"), "type": "template", "template": { "name": "later", "language": { "code": "en" } },
        "send_at": wa_router::domain::rfc3339(wa_router::domain::now_ms() + 3_600_000), "tags": ["kept"], "idempotency_key": "k-1" });
    let (_, first) = r
        .api(
            reqwest::Method::POST,
            "/v1/messages",
            Some(scheduled.clone()),
        )
        .await;
    assert_eq!(r.stop(), 0);
    assert!(r.dir.join("data").join("snapshot.log").exists());
    let r = Router::start(dir.path(), &graph.uri(), "10s", "").await;
    let (_, rec) = r
        .api(
            reqwest::Method::GET,
            &format!("/v1/messages/{}", first["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(rec["status"], "scheduled");
    assert_eq!(rec["tags"], json!(["kept"]));
    let (_, queues) = r.api(reqwest::Method::GET, "/v1/queues", None).await;
    assert_eq!(queues["queues"][0]["scheduled"], 1);
    // The idempotency key is remembered across the restart.
    let (status, again) = r
        .api(reqwest::Method::POST, "/v1/messages", Some(scheduled))
        .await;
    assert_eq!((status, &again["id"]), (202, &first["id"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_journal_stops_startup_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let (graph, _) = graph_mock().await;
    let mut r = Router::start(dir.path(), &graph.uri(), "50ms", "").await;
    for i in 0..3 {
        r.api(
            reqwest::Method::POST,
            "/v1/messages",
            Some(template(&format!("c{i}"))),
        )
        .await;
    }
    assert_eq!(r.stop(), 0);
    let snapshot = dir.path().join("data").join("snapshot.log");
    let mut bytes = std::fs::read(&snapshot).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x55;
    std::fs::write(&snapshot, &bytes).unwrap();
    let out = Command::new(BIN)
        .args(["serve", "-c", "wa-router.toml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("snapshot.log") && err.contains("corrupt"),
        "{err}"
    );
}

#[test]
fn an_unusable_data_dir_is_a_clear_startup_error() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), "http://127.0.0.1:9", "1s", "", "");
    // A file where the data directory should be.
    std::fs::write(dir.path().join("data"), "not a directory").unwrap();
    let out = Command::new(BIN)
        .args(["serve", "-c", "wa-router.toml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("storage") && err.contains("data"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undelivered_events_survive_a_restart_with_their_ids() {
    let dir = tempfile::tempdir().unwrap();
    let (graph, _) = graph_mock().await;
    let target = MockServer::start().await;
    let forward =
        "[[rule]]\nname = \"to agents\"\nwhen = { text = \"agent\" }\nforward = \"agents\"\n";
    // First run: the target is down (port 1 refuses connections).
    let down = "[targets.agents]\nurl = \"http://127.0.0.1:1/events\"\nsecret = \"s\"\nevents = [\"message\"]\n";
    let mut r = Router::start_with(dir.path(), &graph.uri(), "50ms", forward, down).await;
    assert_eq!(
        r.webhook(&notification(vec![text(ANA, "agent")], vec![]))
            .await,
        200
    );
    wait_for(10, "a failed delivery", || async {
        let m = r.metrics_text().await?;
        m.contains("result=\"retry\"").then_some(())
    })
    .await;
    r.kill();
    // Second run: the target is up; the same event arrives.
    Mock::given(method("POST"))
        .respond_with(wiremock::ResponseTemplate::new(200))
        .mount(&target)
        .await;
    let up = format!(
        "[targets.agents]\nurl = \"{}/events\"\nsecret = \"s\"\nevents = [\"message\"]\n",
        target.uri()
    );
    let _r = Router::start_with(dir.path(), &graph.uri(), "50ms", forward, &up).await;
    let got = wait_for(15, "the event after restart", || async {
        let reqs = target.received_requests().await.unwrap_or_default();
        (!reqs.is_empty()).then_some(reqs)
    })
    .await;
    let body: Value = serde_json::from_slice(&got[0].body).unwrap();
    assert_eq!(body["event"], "message.received");
    assert_eq!(
        got[0]
            .headers
            .get("x-router-event-id")
            .unwrap()
            .to_str()
            .unwrap(),
        body["id"].as_str().unwrap()
    );
}

const ECHO: &str = "[[rule]]\nname = \"echo\"\nsend = [ { type = \"text\", body = \"echo {{ message.text }}\" } ]\n";

/// All pages of `GET /v1/messages` with a query.
async fn all_records(r: &Router, query: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    loop {
        let (status, page) = r
            .api(
                reqwest::Method::GET,
                &format!("/v1/messages?limit=200{query}{cursor}"),
                None,
            )
            .await;
        assert_eq!(status, 200);
        out.extend(page["messages"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => return out,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_points_under_load_loses_nothing_accepted() {
    let seed = std::env::var("FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("FAULT_SEED={seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let dir = tempfile::tempdir().unwrap();
    let (graph, arrivals) = graph_mock().await;
    let acked_inbound = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let accepted = std::sync::Arc::new(std::sync::Mutex::new(Vec::<(String, String)>::new()));
    let mut counter = 0usize;
    for round in 0..3 {
        let mut r = Router::start(dir.path(), &graph.uri(), "5ms", ECHO).await;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut load = Vec::new();
        for worker in 0..4 {
            let (http, base, stop, acked_inbound, accepted) = (
                r.http.clone(),
                r.url(""),
                stop.clone(),
                acked_inbound.clone(),
                accepted.clone(),
            );
            let start = counter + worker * 100_000;
            load.push(tokio::spawn(async move {
                let mut i = start;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    let who = format!("1631{:07}", i % 5000);
                    if i.is_multiple_of(2) {
                        let mut m = text(&who, &format!("m{i}"));
                        m["id"] = json!(format!("wamid.load.{i}"));
                        let body = serde_json::to_vec(&notification(vec![m], vec![])).unwrap();
                        let resp = http.post(format!("{base}/webhook")).header("X-Hub-Signature-256", sign(&body, APP_SECRET)).body(body).send().await;
                        if let Ok(resp) = resp
                            && resp.status() == 200
                        {
                            acked_inbound.lock().unwrap().push(format!("m{i}"));
                        }
                    } else {
                        let name = format!("t{i}");
                        let body = json!({ "to": format!("+{who}"), "type": "template", "template": { "name": name, "language": { "code": "en" } } });
                        let resp = http.post(format!("{base}/v1/messages")).header("X-API-Key", API_KEY).json(&body).send().await;
                        if let Ok(resp) = resp
                            && resp.status() == 202
                            && let Ok(v) = resp.json::<Value>().await
                        {
                            accepted.lock().unwrap().push((v["id"].as_str().unwrap().to_string(), name));
                        }
                    }
                }
            }));
        }
        tokio::time::sleep(std::time::Duration::from_millis(rng.u64(150..900))).await;
        r.kill();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for l in load {
            l.await.unwrap();
        }
        counter += 1_000_000;
        println!(
            "round {round}: {} inbound acked, {} messages accepted so far",
            acked_inbound.lock().unwrap().len(),
            accepted.lock().unwrap().len()
        );
    }
    let r = Router::start(dir.path(), &graph.uri(), "5ms", ECHO).await;
    let accepted = accepted.lock().unwrap().clone();
    let acked_inbound = acked_inbound.lock().unwrap().clone();
    assert!(
        accepted.len() > 10 && acked_inbound.len() > 10,
        "the load ran"
    );
    // Every accepted message exists and ends sent or recorded failed.
    let records = wait_for(60, "every message to settle", || async {
        let all = all_records(&r, "").await;
        let settled = all
            .iter()
            .all(|m| m["status"] == "sent" || m["status"] == "failed");
        settled.then_some(all)
    })
    .await;
    let by_id: std::collections::HashMap<&str, &Value> = records
        .iter()
        .map(|m| (m["id"].as_str().unwrap(), m))
        .collect();
    let sent: Vec<String> = arrivals
        .lock()
        .unwrap()
        .iter()
        .map(|(_, b)| body_text(b))
        .collect();
    let count = |text: &str| sent.iter().filter(|s| *s == text).count();
    for (id, name) in &accepted {
        let rec = by_id
            .get(id.as_str())
            .unwrap_or_else(|| panic!("accepted message {id} lost (seed {seed})"));
        match rec["status"].as_str().unwrap() {
            "sent" => assert_eq!(count(name), 1, "{name} (seed {seed})"),
            _ => {
                assert_eq!(rec["error"]["code"], "interrupted", "{rec}");
                assert!(count(name) <= 1, "{name} (seed {seed})");
            }
        }
    }
    // Every acknowledged inbound message was answered once, or its reply is
    // recorded as interrupted; never twice.
    let interrupted = records
        .iter()
        .filter(|m| m["error"]["code"] == "interrupted" && m["source"] == "rule:echo")
        .count();
    let mut answered = 0;
    for m in &acked_inbound {
        let n = count(&format!("echo {m}"));
        assert!(n <= 1, "{m} answered {n} times (seed {seed})");
        answered += n;
    }
    assert!(
        answered + interrupted >= acked_inbound.len(),
        "answered {answered} + interrupted {interrupted} < acked {} (seed {seed})",
        acked_inbound.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_router_on_the_same_data_dir_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let (graph, _) = graph_mock().await;
    let r = Router::start(dir.path(), &graph.uri(), "50ms", "").await;
    let second = tempfile::tempdir().unwrap();
    // Same data directory (absolute), another port.
    let data = dir.path().join("data");
    write_config(second.path(), &graph.uri(), "50ms", "", "");
    let config = std::fs::read_to_string(second.path().join("wa-router.toml"))
        .unwrap()
        .replace(
            "data_dir = \"data\"",
            &format!("data_dir = \"{}\"", data.display()),
        );
    std::fs::write(second.path().join("wa-router.toml"), config).unwrap();
    let out = Command::new(BIN)
        .args(["serve", "-c", "wa-router.toml"])
        .current_dir(second.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("in use by another wa-router"), "{err}");
    // The first one is unharmed.
    let (status, _) = r.api(reqwest::Method::GET, "/v1/queues", None).await;
    assert_eq!(status, 200);
}

/// Mount a tmpfs of `size` at `dir` (root only). Set
/// WA_ROUTER_SKIP_MOUNT_TESTS=1 where mounting is not allowed.
fn mount_tmpfs(dir: &Path, size: &str) -> bool {
    std::fs::create_dir_all(dir).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success());
    if !ok && std::env::var_os("WA_ROUTER_SKIP_MOUNT_TESTS").is_some() {
        return false;
    }
    assert!(
        ok,
        "mounting a small tmpfs failed (needs root); set WA_ROUTER_SKIP_MOUNT_TESTS=1 to skip"
    );
    true
}

struct Unmount(PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_503_and_loses_nothing_acknowledged() {
    fill_the_disk_then_restart(Stop::Crash).await;
}

/// Issue #7.1: a clean stop after the disk filled must not leave a data_dir
/// that refuses to start (it used to rotate past the torn log).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_then_a_clean_stop_restarts_with_everything_acknowledged() {
    fill_the_disk_then_restart(Stop::Clean).await;
}

enum Stop {
    Crash,
    Clean,
}

async fn fill_the_disk_then_restart(how: Stop) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    if !mount_tmpfs(&data, "1m") {
        return;
    }
    let _unmount = Unmount(data.clone());
    let (graph, _) = graph_mock().await;
    let mut r = Router::start(dir.path(), &graph.uri(), "1h", "").await;
    let padding = "x".repeat(8000);
    let mut accepted = Vec::new();
    let mut refused = None;
    for i in 0..200 {
        let mut body = template(&format!("full{i}"));
        body["metadata"] = json!({ "padding": padding });
        let (status, answer) = r
            .api(reqwest::Method::POST, "/v1/messages", Some(body))
            .await;
        match status {
            202 => accepted.push(answer["id"].as_str().unwrap().to_string()),
            _ => {
                refused = Some((status, answer));
                break;
            }
        }
    }
    let (status, answer) = refused.expect("the disk filled up");
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (503, Some("storage_unavailable")),
        "{answer}"
    );
    assert!(!accepted.is_empty());
    let ready = r.http.get(r.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    assert_eq!(
        r.webhook(&notification(vec![text(ANA, "hi")], vec![]))
            .await,
        503,
        "Meta must retry what cannot be recorded"
    );
    match how {
        Stop::Crash => r.kill(),
        Stop::Clean => assert_eq!(r.stop(), 0, "a clean stop exits 0 even on a full disk"),
    }
    // Make room and restart: everything answered 202 is there.
    assert!(
        Command::new("mount")
            .args(["-o", "remount,size=8m"])
            .arg(&data)
            .status()
            .unwrap()
            .success()
    );
    let r = Router::start(dir.path(), &graph.uri(), "1h", "").await;
    for id in &accepted {
        let (status, _) = r
            .api(reqwest::Method::GET, &format!("/v1/messages/{id}"), None)
            .await;
        assert_eq!(
            status, 200,
            "message {id} answered 202 before the disk filled was lost"
        );
    }
    // And the router takes new work again.
    let (status, _) = r
        .api(
            reqwest::Method::POST,
            "/v1/messages",
            Some(template("after")),
        )
        .await;
    assert_eq!(status, 202);
}

/// Issue #7.5: power loss can leave a zero-filled tail on the newest log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_filled_log_tail_is_cut_and_startup_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (graph, _) = graph_mock().await;
    let mut r = Router::start(dir.path(), &graph.uri(), "1h", "").await;
    let mut later = template("z");
    later["send_at"] = json!(wa_router::domain::rfc3339(
        wa_router::domain::now_ms() + 3_600_000
    ));
    let (status, sent) = r
        .api(reqwest::Method::POST, "/v1/messages", Some(later))
        .await;
    assert_eq!(status, 202);
    r.kill();
    let data = dir.path().join("data");
    let newest = std::fs::read_dir(&data)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.extension().is_some_and(|x| x == "log")
                && p.file_name().unwrap().to_string_lossy().starts_with("wal-")
        })
        .filter(|p| std::fs::metadata(p).unwrap().len() > 0)
        .max()
        .expect("a log with data");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&newest)
        .unwrap();
    std::io::Write::write_all(&mut f, &[0u8; 4096]).unwrap();
    drop(f);
    let r = Router::start(dir.path(), &graph.uri(), "1h", "").await;
    let (status, rec) = r
        .api(
            reqwest::Method::GET,
            &format!("/v1/messages/{}", sent["id"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!((status, rec["status"].as_str()), (200, Some("scheduled")));
}

/// Issue #7.9: customer data is readable by its owner only.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_dir_and_its_files_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (graph, _) = graph_mock().await;
    let mut r = Router::start(dir.path(), &graph.uri(), "1h", "").await;
    let (status, _) = r
        .api(reqwest::Method::POST, "/v1/messages", Some(template("p")))
        .await;
    assert_eq!(status, 202);
    assert_eq!(r.stop(), 0);
    let data = dir.path().join("data");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700, "data_dir");
    let mut files = 0;
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        assert_eq!(mode(&path), 0o600, "{}", path.display());
        files += 1;
    }
    assert!(files >= 3, "LOCK, a log and the snapshot");
}

/// Issue #8.4: a data_dir written before the journal had a format version
/// (tests/fixtures/journal-v0) still starts with everything it held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_from_the_previous_format_still_starts() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/journal-v0");
    let dir = tempfile::tempdir().unwrap();
    for name in ["wa-router.toml", "routes.toml"] {
        std::fs::copy(fixture.join(name), dir.path().join(name)).unwrap();
    }
    std::fs::create_dir(dir.path().join("data")).unwrap();
    for entry in std::fs::read_dir(fixture.join("data")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(
            entry.path(),
            dir.path().join("data").join(entry.file_name()),
        )
        .unwrap();
    }
    let r = Router::spawn(dir.path()).await;
    let get = |path: String| {
        let r = &r;
        async move {
            let resp = r
                .http
                .get(r.url(&path))
                .header("X-API-Key", "fixture-key")
                .send()
                .await
                .unwrap();
            (
                resp.status().as_u16(),
                resp.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let (status, scheduled) = get("/v1/messages/msg_01a2390b765b7216ad3241be25736efc".into()).await;
    assert_eq!(status, 200);
    assert_eq!(scheduled["source"], "api");
    assert_eq!(scheduled["tags"], json!(["fixture"]));
    assert_eq!(scheduled["metadata"], json!({ "crm": 42 }));
    let (status, queued) = get("/v1/messages/msg_01a2390b8100752190b10f22af1602b4".into()).await;
    assert_eq!((status, &queued["tags"]), (200, &json!(["second"])));
    let (status, reply) = get("/v1/messages/msg_01a2390b757070d19f467cdda6dfdd19".into()).await;
    assert_eq!(
        (status, reply["source"].as_str()),
        (200, Some("rule:greet"))
    );
    assert_eq!(reply["status"], "sent");
    let (status, ana) = get("/v1/conversations/main/16315551181".into()).await;
    assert_eq!(status, 200);
    assert_eq!(
        (ana["state"].as_str(), ana["name"].as_str()),
        (Some("vip"), Some("Ana"))
    );
    assert_eq!(ana["vars"], json!({ "tier": "gold" }));
    let (_, messages) = get("/v1/conversations/main/16315551181/messages".into()).await;
    let texts: Vec<&str> = messages["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["text"].as_str())
        .collect();
    assert!(
        texts.contains(&"hi") && texts.contains(&"thanks"),
        "{texts:?}"
    );
    let (_, bob) = get("/v1/conversations/main/16315551182".into()).await;
    assert_eq!(bob["opted_out"], true);
    let (status, _) = get("/v1/conversations/999000111/16315551183".into()).await;
    assert_eq!(status, 200, "the sandbox account registered from a webhook");
}

/// Issue #9.3: settled records and the history leave memory for the
/// archive, and every read still answers for them — before and after a
/// SIGKILL, including a status that came for an archived record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_messages_leave_memory_and_still_answer() {
    let dir = tempfile::tempdir().unwrap();
    let (graph, _) = graph_mock().await;
    let mut r = Router::start(dir.path(), &graph.uri(), "0s", "").await;
    assert_eq!(
        r.webhook(&notification(vec![text(ANA, "hi")], vec![]))
            .await,
        200
    );
    let ids = accept_templates(&r, 20).await;
    settled(&r, &ids, 20).await;
    wait_for(20, "the records to leave memory", || async {
        let text = r.metrics_text().await?;
        let held = metric_value(&text, "wa_router_records_in_memory")?;
        let backlog = metric_value(&text, "wa_router_archive_backlog")?;
        (held == 0.0 && backlog == 0.0).then_some(())
    })
    .await;
    // Delivered, for a record that is archived by now.
    let (_, first) = r
        .api(
            reqwest::Method::GET,
            &format!("/v1/messages/{}", ids[0]),
            None,
        )
        .await;
    let wamid = first["wamid"].as_str().unwrap().to_string();
    assert_eq!(
        r.webhook(&notification(
            vec![],
            vec![status(&wamid, "delivered", ANA)]
        ))
        .await,
        200
    );
    for round in ["before the crash", "after the crash"] {
        let (_, one) = r
            .api(
                reqwest::Method::GET,
                &format!("/v1/messages/{}", ids[0]),
                None,
            )
            .await;
        assert_eq!(one["status"], "delivered", "{round}: {one}");
        // Every record, newest first, over pages of 7.
        let mut listed = Vec::new();
        let mut cursor = String::new();
        loop {
            let (status, page) = r
                .api(
                    reqwest::Method::GET,
                    &format!("/v1/messages?account=main&limit=7{cursor}"),
                    None,
                )
                .await;
            assert_eq!(status, 200, "{round}: {page}");
            for m in page["messages"].as_array().unwrap() {
                listed.push(m["id"].as_str().unwrap().to_string());
            }
            match page["next_cursor"].as_str() {
                Some(c) => cursor = format!("&cursor={c}"),
                None => break,
            }
        }
        let mut newest_first = ids.clone();
        newest_first.reverse();
        assert_eq!(listed, newest_first, "{round}");
        let (status, sent) = r
            .api(
                reqwest::Method::GET,
                "/v1/messages?status=sent&limit=100",
                None,
            )
            .await;
        assert_eq!(status, 200);
        assert_eq!(sent["messages"].as_array().unwrap().len(), 19, "{round}");
        // The history: the inbound "hi" and the 20 sends, with statuses.
        let (status, history) = r
            .api(
                reqwest::Method::GET,
                &format!("/v1/conversations/main/{ANA}/messages"),
                None,
            )
            .await;
        assert_eq!(status, 200, "{round}: {history}");
        let history = history["messages"].as_array().unwrap().clone();
        assert_eq!(history.len(), 21, "{round}");
        assert_eq!(history[0]["direction"], "in", "{round}");
        assert_eq!(history[1]["status"], "delivered", "{round}");
        assert_eq!(history[20]["status"], "sent", "{round}");
        if round == "before the crash" {
            r.kill();
            r = Router::spawn(dir.path()).await;
        }
    }
}
