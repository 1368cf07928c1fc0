//! Issue #12: routers sharing their state on Redis. Two routers in this
//! process, one Redis: `$WA_ROUTER_TEST_REDIS` (`.ci/run` starts one), or
//! else a `redis-server` of each test's own on a Unix socket.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::*;

/// A Redis for one test: the shared one, or a server of its own (stopped
/// when dropped).
pub struct TestRedis {
    pub url: String,
    server: Option<(Child, std::path::PathBuf)>,
    _dir: Option<tempfile::TempDir>,
}

impl TestRedis {
    /// `None` (the test says so and passes) only outside CI when no Redis
    /// is to be had.
    pub fn get() -> Option<TestRedis> {
        if let Ok(url) = std::env::var("WA_ROUTER_TEST_REDIS") {
            return Some(TestRedis {
                url,
                server: None,
                _dir: None,
            });
        }
        Self::own()
    }

    /// A server of this test's own (to stop and start it again).
    pub fn own() -> Option<TestRedis> {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("redis.sock");
        let mut r = TestRedis {
            url: format!("unix://{}", socket.display()),
            server: None,
            _dir: None,
        };
        if !r.start(&socket) {
            assert!(
                std::env::var_os("CI").is_none(),
                "redis-server is needed for the cluster tests (.ci/run installs it)"
            );
            eprintln!(
                "SKIPPED: no redis-server on PATH; install redis-server to run the cluster tests"
            );
            return None;
        }
        r._dir = Some(dir);
        Some(r)
    }

    fn start(&mut self, socket: &std::path::Path) -> bool {
        let dir = socket.parent().unwrap();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(socket)
            .args([
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(child) = child else {
            return false;
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.server = Some((child, socket.to_path_buf()));
        true
    }

    /// Stop the test's own server (Redis goes away).
    pub fn stop(&mut self) -> std::path::PathBuf {
        let (mut child, socket) = self.server.take().expect("a server of the test's own");
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_file(&socket);
        socket
    }

    pub fn restart(&mut self, socket: &std::path::Path) {
        assert!(self.start(socket), "redis-server starts again");
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        if let Some((mut child, _)) = self.server.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The `[cluster]` table for a router of a test's cluster: a key prefix of
/// the test's own, so tests sharing one Redis do not meet.
fn cluster_toml(redis: &TestRedis, prefix: &str, node: &str) -> String {
    format!(
        "[cluster]\nredis_url = \"{}\"\nnode_id = \"{node}\"\nprefix = \"{prefix}\"\nlease_ttl = \"2s\"\n",
        redis.url
    )
}

fn unique_prefix() -> String {
    format!("t-{}:", new_wamid())
}

/// Two routers on one Redis and one Graph mock (A's). A starts first and
/// takes the account's lease; B answers webhooks and API calls as well.
async fn pair(redis: &TestRedis, routes: &str, pace: &'static str) -> (TestApp, TestApp) {
    pair_with(redis, routes, pace, 1000, 1000).await
}

async fn pair_with(
    redis: &TestRedis,
    routes: &str,
    pace: &'static str,
    rate: u32,
    burst: u32,
) -> (TestApp, TestApp) {
    let prefix = unique_prefix();
    let a = spawn_with(Options {
        routes: routes.into(),
        pace,
        rate,
        burst,
        extra: cluster_toml(redis, &prefix, "a"),
        ..Options::default()
    })
    .await;
    wait_for(10, "router A to hold the account's lease", || async {
        let leases = a.healthz().await["cluster"]["leases"].clone();
        leases
            .as_array()?
            .contains(&json!("account/main"))
            .then_some(())
    })
    .await;
    let b = spawn_with(Options {
        routes: routes.into(),
        pace,
        rate,
        burst,
        extra: cluster_toml(redis, &prefix, "b"),
        graph_url: Some(a.graph.uri()),
        ..Options::default()
    })
    .await;
    (a, b)
}

/// Barrier on the lease holder: rules run and its queue empty.
async fn drained(holder: &TestApp) {
    holder.rules_idle().await;
    wait_for(10, "the queue to be empty", || async {
        let (_, q) = holder.api(Method::GET, "/v1/queues", None).await;
        let q = &q["queues"][0];
        (q["depth"] == 0).then_some(())
    })
    .await;
}

/// Sends to `to` that reached the Graph mock.
async fn sends_to(app: &TestApp, to: &str) -> Vec<Value> {
    app.sends()
        .await
        .into_iter()
        .filter(|b| b["to"] == to)
        .collect()
}

#[tokio::test]
async fn the_same_webhook_to_both_routers_runs_the_rules_once() {
    let Some(redis) = TestRedis::get() else {
        return;
    };
    let (a, b) = pair(&redis, GREETING, "10ms").await;
    let hi = text(ANA, "hi");
    let body = serde_json::to_vec(&notification(vec![hi], vec![])).unwrap();
    let (ra, rb) = tokio::join!(a.post_webhook(&body), b.post_webhook(&body));
    assert_eq!((ra.status().as_u16(), rb.status().as_u16()), (200, 200));
    // Meta retries the same notification later, to either of them.
    assert_eq!(b.post_webhook(&body).await.status(), 200);
    // Barrier: a later message of another contact has been answered, and
    // nothing is queued or being sent any more.
    b.say(BOB, "hi").await;
    wait_for(10, "Bob's greeting", || async {
        (!sends_to(&a, BOB).await.is_empty()).then_some(())
    })
    .await;
    drained(&a).await;
    let to_ana = sends_to(&a, ANA).await;
    assert_eq!(to_ana.len(), 1, "one greeting for one message: {to_ana:?}");
    assert_eq!(to_ana[0]["type"], "interactive");
}

#[tokio::test]
async fn a_webhook_to_one_router_and_an_api_reply_to_the_other_is_accepted() {
    let Some(redis) = TestRedis::get() else {
        return;
    };
    let (a, b) = pair(&redis, GREETING, "10ms").await;
    a.say(ANA, "hi").await;
    // Straight away: B reads the cluster's state before answering.
    let (status, body) = b.send_text(ANA, "An agent here").await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    // The record is visible from both routers and ends sent.
    let sent = a.wait_status(&id, "sent").await;
    assert_eq!(sent["to"], ANA);
    wait_for(10, "B to see it sent", || async {
        let (s, r) = b
            .api(Method::GET, &format!("/v1/messages/{id}"), None)
            .await;
        (s == 200 && r["status"] == "sent").then_some(())
    })
    .await;
    let texts = a.wait_texts(ANA, 2).await;
    assert!(texts.contains(&"An agent here".to_string()), "{texts:?}");
    // The conversation B shows is the one A opened.
    let (s, conv) = b
        .api(Method::GET, &format!("/v1/conversations/main/{ANA}"), None)
        .await;
    assert_eq!(s, 200, "{conv}");
    assert_eq!(conv["window"]["open"], true, "{conv}");
    assert_eq!(
        conv["messages"], 3,
        "hi, the greeting and the reply: {conv}"
    );
    // A contact nobody wrote from has no window on either router.
    let (status, body) = b.send_text(BOB, "Unprompted").await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "window_closed");
}

#[tokio::test]
async fn messages_queued_through_both_routers_leave_in_acceptance_order_with_pace() {
    let Some(redis) = TestRedis::get() else {
        return;
    };
    let (a, b) = pair(&redis, GREETING, "50ms").await;
    a.say(ANA, "hello there").await;
    let mut ids = Vec::new();
    for i in 0..100 {
        let via = if i % 2 == 0 { &a } else { &b };
        let (status, body) = via.send_text(ANA, &format!("m{i}")).await;
        assert_eq!(status, 202, "{body}");
        ids.push(body["id"].as_str().unwrap().to_string());
    }
    let texts = wait_for(30, "100 sends", || async {
        let t: Vec<String> = sends_to(&a, ANA)
            .await
            .iter()
            .map(body_text)
            .filter(|t| t.starts_with('m'))
            .collect();
        (t.len() >= 100).then_some(t)
    })
    .await;
    let want: Vec<String> = (0..100).map(|i| format!("m{i}")).collect();
    assert_eq!(texts, want, "acceptance order across both routers");
    // pace: starts at least 50 ms apart. Arrivals at the mock (which
    // answers at once) also carry the jitter of the log write before each
    // call and of the HTTP client, so a gap may look a little shorter; over
    // the whole run the pace holds.
    let arrivals: Vec<std::time::Instant> = a
        .arrivals()
        .into_iter()
        .filter(|(_, b)| b["to"] == ANA && body_text(b).starts_with('m'))
        .map(|(t, _)| t)
        .collect();
    assert_eq!(arrivals.len(), 100);
    for w in arrivals.windows(2) {
        assert!(
            w[1] - w[0] >= Duration::from_millis(35),
            "sends {:?} apart",
            w[1] - w[0]
        );
    }
    let span = arrivals[99] - arrivals[0];
    assert!(span >= Duration::from_millis(99 * 50 - 20), "{span:?}");
    for id in &ids {
        let (s, r) = b
            .api(Method::GET, &format!("/v1/messages/{id}"), None)
            .await;
        assert_eq!(s, 200);
        assert_eq!(r["status"], "sent", "{r}");
    }
}

#[tokio::test]
async fn without_redis_the_router_is_not_ready_and_webhooks_get_503() {
    let Some(mut redis) = TestRedis::own() else {
        return;
    };
    let app = spawn_with(Options {
        extra: cluster_toml(&redis, &unique_prefix(), "solo"),
        ..Options::default()
    })
    .await;
    let ready = || async {
        app.http
            .get(app.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(ready().await, 200);
    let socket = redis.stop();
    wait_for(10, "/readyz to say 503", || async {
        (ready().await == 503).then_some(())
    })
    .await;
    let body = serde_json::to_vec(&notification(vec![text(ANA, "hi")], vec![])).unwrap();
    let resp = app.post_webhook(&body).await;
    assert_eq!(resp.status(), 503);
    let err: Value = resp.json().await.unwrap();
    assert_eq!(err["error"]["code"], "storage_unavailable", "{err}");
    // Redis back: ready again, and Meta's retry is taken and answered.
    redis.restart(&socket);
    wait_for(15, "/readyz to say 200", || async {
        (ready().await == 200).then_some(())
    })
    .await;
    wait_for(15, "the retried webhook to be taken", || async {
        (app.post_webhook(&body).await.status() == 200).then_some(())
    })
    .await;
    let texts = app.wait_texts(ANA, 1).await;
    assert_eq!(texts.len(), 1, "{texts:?}");
}

/// A Graph API that answers like [`GraphOk`] after `delay` (so that sends
/// are in flight when a router dies).
struct SlowGraph(GraphOk, Duration);

impl wiremock::Respond for SlowGraph {
    fn respond(&self, req: &wiremock::Request) -> wiremock::ResponseTemplate {
        self.0.respond(req).set_delay(self.1)
    }
}

#[tokio::test]
async fn sigkill_of_the_lease_holder_under_load_loses_and_duplicates_nothing() {
    use crate::durability::{
        Router, sent_once_or_interrupted, settled, template_names, write_config,
    };
    use wiremock::matchers::{method, path_regex};
    let Some(redis) = TestRedis::get() else {
        return;
    };
    let graph = wiremock::MockServer::start().await;
    let arrivals = Arrivals::default();
    wiremock::Mock::given(method("POST"))
        .and(path_regex(r"^/v25\.0/\d+/messages$"))
        .respond_with(SlowGraph(
            GraphOk::new(Default::default(), arrivals.clone()),
            Duration::from_millis(40),
        ))
        .mount(&graph)
        .await;
    let prefix = unique_prefix();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for (dir, node) in [(&dir_a, "a"), (&dir_b, "b")] {
        write_config(
            dir.path(),
            &graph.uri(),
            "5ms",
            GREETING,
            &cluster_toml(&redis, &prefix, node),
        );
    }
    let mut a = Router::spawn(dir_a.path()).await;
    let holds = |r: &Router| {
        let url = r.url("/healthz");
        async move {
            let h: Value = reqwest::get(url).await.ok()?.json().await.ok()?;
            h["cluster"]["leases"]
                .as_array()?
                .contains(&json!("account/main"))
                .then_some(())
        }
    };
    wait_for(10, "A to hold the lease", || holds(&a)).await;
    let b = Router::spawn(dir_b.path()).await;
    // Templates (no window needed) to four contacts, through both routers.
    let contacts = ["16315551201", "16315551202", "16315551203", "16315551204"];
    let mut ids = Vec::new();
    async fn send(r: &Router, to: &str, i: usize) -> String {
        let body = json!({
            "to": to,
            "type": "template",
            "template": { "name": format!("t{i}"), "language": { "code": "en" } }
        });
        let (status, body) = r.api(Method::POST, "/v1/messages", Some(body)).await;
        assert_eq!(status, 202, "{body}");
        body["id"].as_str().unwrap().to_string()
    }
    for i in 0..120 {
        ids.push(send(if i % 2 == 0 { &a } else { &b }, contacts[i % 4], i).await);
    }
    // A dies while its sends are in flight.
    wait_for(10, "sends to be under way", || async {
        (arrivals.lock().unwrap().len() >= 10).then_some(())
    })
    .await;
    a.kill();
    let at_kill = arrivals.lock().unwrap().len();
    for i in 120..200 {
        ids.push(send(&b, contacts[i % 4], i).await);
    }
    wait_for(15, "B to take the lease over", || holds(&b)).await;
    let records = settled(&b, &ids, 60).await;
    sent_once_or_interrupted(&records, &template_names(&arrivals));
    let failed = records.iter().filter(|r| r["status"] == "failed").count();
    assert!(failed <= 4, "at most one in flight per contact: {failed}");
    eprintln!(
        "{} sent, {failed} interrupted; {} arrived before the kill",
        records.len() - failed,
        at_kill
    );
    assert!(at_kill < 200, "A was killed with work left for B");
    // Per contact, what reached the Graph API is in acceptance order.
    for c in contacts {
        let got: Vec<usize> = arrivals
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, b)| b["to"] == c)
            .map(|(_, b)| {
                b["template"]["name"].as_str().unwrap()[1..]
                    .parse()
                    .unwrap()
            })
            .collect();
        assert!(got.windows(2).all(|w| w[0] < w[1]), "order to {c}: {got:?}");
    }
}

#[tokio::test]
async fn an_idempotency_key_sent_to_both_routers_at_once_sends_once() {
    let Some(redis) = TestRedis::get() else {
        return;
    };
    let (a, b) = pair(&redis, GREETING, "10ms").await;
    let body = json!({
        "to": ANA,
        "type": "template",
        "template": { "name": "welcome", "language": { "code": "en" } },
        "idempotency_key": "order-42"
    });
    let ((sa, ra), (sb, rb)) = tokio::join!(
        a.api(Method::POST, "/v1/messages", Some(body.clone())),
        b.api(Method::POST, "/v1/messages", Some(body.clone()))
    );
    assert_eq!((sa, sb), (202, 202), "{ra} {rb}");
    assert_eq!(ra["id"], rb["id"], "one message for one key");
    // Another body with the key, on either router: a conflict.
    let mut other = body.clone();
    other["template"]["name"] = json!("other");
    let (s, e) = b.api(Method::POST, "/v1/messages", Some(other)).await;
    assert_eq!(s, 409, "{e}");
    assert_eq!(e["error"]["code"], "idempotency_conflict");
    a.wait_status(ra["id"].as_str().unwrap(), "sent").await;
    // A later key is sent (and is the barrier for "nothing else went").
    let (s, later) = b
        .api(
            Method::POST,
            "/v1/messages",
            Some(json!({
                "to": ANA, "type": "template",
                "template": { "name": "later", "language": { "code": "en" } }
            })),
        )
        .await;
    assert_eq!(s, 202, "{later}");
    a.wait_status(later["id"].as_str().unwrap(), "sent").await;
    let names: Vec<String> = sends_to(&a, ANA)
        .await
        .iter()
        .map(|b| {
            b["template"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    assert_eq!(names, ["welcome", "later"]);
}

#[tokio::test]
async fn an_api_key_rate_limit_holds_across_routers() {
    let Some(redis) = TestRedis::get() else {
        return;
    };
    let (a, b) = pair_with(&redis, GREETING, "10ms", 1, 2).await;
    async fn queues(r: &TestApp) -> u16 {
        r.api(Method::GET, "/v1/queues", None).await.0
    }
    // The burst of 2 is shared: one call each, then both are limited.
    assert_eq!(queues(&a).await, 200);
    assert_eq!(queues(&b).await, 200);
    let resp = b
        .http
        .get(b.url("/v1/queues"))
        .header("X-API-Key", API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert!(resp.headers().get("retry-after").is_some());
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");
    assert_eq!(queues(&a).await, 429);
}

#[tokio::test]
async fn an_event_the_dead_router_could_not_deliver_is_delivered_by_the_other() {
    use crate::durability::{Router, write_config};
    use wiremock::matchers::method;
    let Some(redis) = TestRedis::get() else {
        return;
    };
    let graph = wiremock::MockServer::start().await;
    wiremock::Mock::given(method("POST"))
        .respond_with(GraphOk::new(Default::default(), Arrivals::default()))
        .mount(&graph)
        .await;
    // The agents' endpoint is down at first.
    let agents = wiremock::MockServer::start().await;
    wiremock::Mock::given(method("POST"))
        .respond_with(wiremock::ResponseTemplate::new(503))
        .with_priority(5)
        .mount(&agents)
        .await;
    let routes = r#"
[[rule]]
name = "sales"
when = { text = "sales" }
forward = "agents"
"#;
    let prefix = unique_prefix();
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for (dir, node) in [(&dir_a, "a"), (&dir_b, "b")] {
        let extra = format!(
            "{}[targets.agents]\nurl = \"{}/events\"\nsecret = \"{TARGET_SECRET}\"\nevents = [\"message\"]\n",
            cluster_toml(&redis, &prefix, node),
            agents.uri()
        );
        write_config(dir.path(), &graph.uri(), "5ms", routes, &extra);
    }
    let leases = |r: &Router| {
        let url = r.url("/healthz");
        async move {
            let h: Value = reqwest::get(url).await.ok()?.json().await.ok()?;
            // Accounts and targets (not who writes snapshots).
            let held: Vec<Value> = h["cluster"]["leases"]
                .as_array()?
                .iter()
                .filter(|l| l != &&json!("cluster/snapshot"))
                .cloned()
                .collect();
            Some(Value::Array(held))
        }
    };
    let mut a = Router::spawn(dir_a.path()).await;
    wait_for(10, "A to hold both leases", || async {
        (leases(&a).await? == json!(["account/main", "target/agents"])).then_some(())
    })
    .await;
    let b = Router::spawn(dir_b.path()).await;
    let n = notification(vec![text(ANA, "sales")], vec![]);
    assert_eq!(b.webhook(&n).await, 200);
    let event_ids = || async {
        agents
            .received_requests()
            .await
            .unwrap_or_default()
            .iter()
            .filter_map(|r| {
                Some(
                    r.headers
                        .get("x-router-event-id")?
                        .to_str()
                        .ok()?
                        .to_string(),
                )
            })
            .collect::<Vec<String>>()
    };
    let first = wait_for(10, "A's first attempt", || async {
        event_ids().await.first().cloned()
    })
    .await;
    a.kill();
    let tried = event_ids().await.len();
    // The endpoint is back; B takes the target over and delivers.
    wiremock::Mock::given(method("POST"))
        .respond_with(wiremock::ResponseTemplate::new(200))
        .with_priority(1)
        .mount(&agents)
        .await;
    wait_for(15, "B to hold both leases", || async {
        (leases(&b).await? == json!(["account/main", "target/agents"])).then_some(())
    })
    .await;
    let ids = wait_for(15, "B's delivery", || async {
        let ids = event_ids().await;
        (ids.len() > tried).then_some(ids)
    })
    .await;
    assert!(
        ids.iter().all(|id| *id == first),
        "the same event, delivered again: {ids:?}"
    );
}

type Entries = Vec<(String, Vec<(String, Vec<u8>)>)>;

/// Whether stream id `a` comes after `b`.
fn id_after(a: &str, b: &str) -> bool {
    let n = |s: &str| -> (u64, u64) {
        let (ms, seq) = s.split_once('-').unwrap_or((s, "0"));
        (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
    };
    n(a) > n(b)
}

#[tokio::test]
async fn a_snapshot_trims_the_log_and_a_router_started_later_starts_from_it() {
    let Some(redis) = TestRedis::get() else {
        return;
    };
    let prefix = unique_prefix();
    let toml = |node| {
        format!(
            "{}snapshot_after = \"8KB\"\n",
            cluster_toml(&redis, &prefix, node)
        )
    };
    let a = spawn_with(Options {
        extra: toml("a"),
        pace: "0s",
        ..Options::default()
    })
    .await;
    let contacts: Vec<String> = (0..40).map(|i| format!("1631555130{i:02}")).collect();
    for c in &contacts {
        a.say(c, "hi").await;
    }
    for c in &contacts {
        a.wait_texts(c, 1).await;
    }
    let client = redis::Client::open(redis.url.as_str()).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    let log = format!("{prefix}log");
    let snapshot = format!("{prefix}snapshot");
    let covered: String = wait_for(30, "a snapshot and a trimmed log", || {
        let mut conn = conn.clone();
        let (log, snapshot) = (log.clone(), snapshot.clone());
        async move {
            let covered: Option<String> = redis::cmd("GET")
                .arg(&snapshot)
                .query_async(&mut conn)
                .await
                .ok()?;
            let covered = covered?;
            // Entries before the snapshot are gone.
            let first: Entries = redis::cmd("XRANGE")
                .arg(&log)
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut conn)
                .await
                .ok()?;
            let trimmed = first.first().is_none_or(|(id, _)| id_after(id, &covered));
            trimmed.then_some(covered)
        }
    })
    .await;
    assert!(!covered.is_empty());
    // A router that starts now has the conversations from the snapshot:
    // the windows are open and it sends.
    let c = spawn_with(Options {
        extra: toml("c"),
        pace: "0s",
        graph_url: Some(a.graph.uri()),
        ..Options::default()
    })
    .await;
    for contact in &contacts {
        let (s, conv) = c
            .api(
                Method::GET,
                &format!("/v1/conversations/main/{contact}"),
                None,
            )
            .await;
        assert_eq!(s, 200, "{conv}");
        assert_eq!(conv["window"]["open"], true, "{conv}");
    }
    let (s, sent) = c.send_text(&contacts[0], "after the snapshot").await;
    assert_eq!(s, 202, "{sent}");
    let id = sent["id"].as_str().unwrap();
    wait_for(10, "the send", || async {
        let (_, r) = c
            .api(Method::GET, &format!("/v1/messages/{id}"), None)
            .await;
        (r["status"] == "sent").then_some(())
    })
    .await;
}

#[tokio::test]
async fn conversation_changes_through_the_other_router_are_made_by_the_lease_holder() {
    let Some(redis) = TestRedis::get() else {
        return;
    };
    let (a, b) = pair(&redis, GREETING, "10ms").await;
    a.say(ANA, "hi").await;
    a.wait_texts(ANA, 1).await;
    // B hands the conversation to humans: A's rules stay quiet.
    let path = format!("/v1/conversations/main/{ANA}/handoff");
    let (s, conv) = b
        .api(Method::POST, &path, Some(json!({ "ttl": "1h" })))
        .await;
    assert_eq!(s, 200, "{conv}");
    assert_eq!(conv["handoff"]["active"], true, "{conv}");
    b.say(ANA, "hi").await;
    // …and gives it back: the next "hi" is answered again.
    let (s, conv) = b.api(Method::DELETE, &path, None).await;
    assert_eq!(s, 200, "{conv}");
    assert_eq!(conv["handoff"]["active"], false, "{conv}");
    b.say(ANA, "hi").await;
    a.wait_texts(ANA, 2).await;
    drained(&a).await;
    let texts = a.texts_to(ANA).await;
    assert_eq!(texts.len(), 2, "no answer while handed off: {texts:?}");
    // B records an opt-out: A refuses to send.
    let (s, conv) = b
        .api(
            Method::POST,
            &format!("/v1/conversations/main/{ANA}/opt-out"),
            None,
        )
        .await;
    assert_eq!(s, 200, "{conv}");
    assert_eq!(conv["opted_out"], true);
    let (s, e) = a.send_text(ANA, "still there?").await;
    assert_eq!(s, 403, "{e}");
    assert_eq!(e["error"]["code"], "opted_out");
    // B sets the rule state; A shows it.
    let (s, _) = b
        .api(
            Method::PUT,
            &format!("/v1/conversations/main/{BOB}/state"),
            Some(json!({ "state": "vip", "vars": { "tier": "gold" } })),
        )
        .await;
    assert_eq!(s, 200);
    let (_, conv) = a
        .api(Method::GET, &format!("/v1/conversations/main/{BOB}"), None)
        .await;
    assert_eq!(conv["state"], "vip", "{conv}");
    assert_eq!(conv["vars"]["tier"], "gold", "{conv}");
    // B cancels a scheduled message A would send.
    let send_at = wa_router::domain::rfc3339((now_s() + 3600) * 1000);
    let (s, queued) = a
        .send(json!({
            "to": BOB, "type": "template", "send_at": send_at,
            "template": { "name": "later", "language": { "code": "en" } }
        }))
        .await;
    assert_eq!(s, 202, "{queued}");
    let id = queued["id"].as_str().unwrap();
    let (s, r) = b
        .api(Method::DELETE, &format!("/v1/messages/{id}"), None)
        .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["status"], "cancelled");
    let (_, r) = a
        .api(Method::GET, &format!("/v1/messages/{id}"), None)
        .await;
    assert_eq!(r["status"], "cancelled", "{r}");
    let (s, e) = b
        .api(Method::DELETE, &format!("/v1/messages/{id}"), None)
        .await;
    assert_eq!(s, 409, "{e}");
}

#[tokio::test]
async fn accounts_spread_over_the_routers_and_a_handover_loses_nothing() {
    let Some(redis) = TestRedis::get() else {
        return;
    };
    const PNID2: &str = "106540352242923";
    let second = format!(
        "[[accounts]]\nname = \"second\"\nphone_number_id = \"{PNID2}\"\naccess_token = \"{TOKEN}\"\npace = \"5ms\"\n"
    );
    let prefix = unique_prefix();
    const ECHO: &str = r#"
[[rule]]
name = "echo"
when = { type = "text" }
[[rule.send]]
type = "text"
body = "echo: {{ message.text }}"
"#;
    let a = spawn_with(Options {
        routes: ECHO.into(),
        pace: "5ms",
        account_extra: second.clone(),
        extra: cluster_toml(&redis, &prefix, "a"),
        ..Options::default()
    })
    .await;
    async fn accounts(app: &TestApp) -> Option<Vec<String>> {
        let held: Vec<String> = app.healthz().await["cluster"]["leases"]
            .as_array()?
            .iter()
            .filter_map(|l| l.as_str()?.strip_prefix("account/").map(str::to_string))
            .collect();
        Some(held)
    }
    wait_for(10, "A to hold both accounts", || async {
        (accounts(&a).await?.len() == 2).then_some(())
    })
    .await;
    let b = spawn_with(Options {
        routes: ECHO.into(),
        pace: "5ms",
        account_extra: second,
        extra: cluster_toml(&redis, &prefix, "b"),
        graph_url: Some(a.graph.uri()),
        ..Options::default()
    })
    .await;
    // Messages to both numbers while one account moves to B.
    let to_second = |msg: Value| {
        serde_json::to_string(&notification(vec![msg], vec![]))
            .unwrap()
            .replace(PNID, PNID2)
    };
    let mut sent = 0;
    let moved = wait_for(30, "one account on each router", || {
        sent += 1;
        let i = sent;
        let (a, b) = (&a, &b);
        async move {
            let via = if i % 2 == 0 { a } else { b };
            via.deliver(&notification(vec![text(ANA, &format!("m{i}"))], vec![]))
                .await;
            let body = to_second(text(BOB, &format!("m{i}")));
            assert_eq!(via.post_webhook(body.as_bytes()).await.status(), 200);
            let (ha, hb) = (accounts(a).await?, accounts(b).await?);
            (ha.len() == 1 && hb.len() == 1).then_some((ha, hb))
        }
    })
    .await;
    assert_ne!(moved.0, moved.1, "{moved:?}");
    // Every message is answered once, in order, by whichever router held
    // its account at the time.
    let n = sent;
    for (who, phone) in [(ANA, PNID), (BOB, PNID2)] {
        let echoes = wait_for(20, &format!("{n} echoes to {who}"), || async {
            let got: Vec<String> = sends_to(&a, who).await.iter().map(body_text).collect();
            (got.len() >= n).then_some(got)
        })
        .await;
        let want: Vec<String> = (1..=n).map(|i| format!("echo: m{i}")).collect();
        assert_eq!(echoes, want, "replies to {who} (number {phone})");
    }
}

#[tokio::test]
async fn the_live_stream_of_either_router_shows_what_the_other_did() {
    use crate::stream::Stream;
    let Some(redis) = TestRedis::get() else {
        return;
    };
    let (a, b) = pair(&redis, GREETING, "10ms").await;
    // B does not hold the account: A routes and sends.
    let mut watch = Stream::open(&b).await;
    let wamid = a.say(ANA, "hi").await;
    let (_, body) = watch
        .next_where(|e, b| e == "message.received" && b["message"]["id"] == wamid.as_str())
        .await;
    assert_eq!(body["contact"]["wa_id"], ANA);
    assert!(
        body["conversation"]["window_expires_at"].is_string(),
        "{body}"
    );
    let (_, status) = watch
        .next_where(|e, b| e == "message.status" && b["status"] == "sent")
        .await;
    assert_eq!(status["to"], ANA);
}

/// A contact's new BSUID (`user_id_update`) posted to the router that does
/// not hold the account, between two messages posted there too: the lease
/// holder applies it in order with the number's messages, so the second
/// message finds the conversation the first one started.
#[tokio::test]
async fn a_new_bsuid_posted_to_the_other_router_applies_in_order_with_the_messages() {
    let Some(redis) = TestRedis::get() else {
        return;
    };
    let (a, b) = pair(&redis, STATEFUL, "10ms").await;
    let (old, new) = ("US.4410001", "US.4410002");
    b.deliver(&from_bsuid(old, "hi")).await;
    b.deliver(&user_id_update(old, new)).await;
    b.deliver(&from_bsuid(new, "again")).await;
    let sent = wait_for(10, "two replies", || async {
        let s: Vec<Value> = a
            .graph
            .received_requests()
            .await
            .unwrap_or_default()
            .iter()
            .filter_map(|r| serde_json::from_slice::<Value>(&r.body).ok())
            .filter(|b| b.get("recipient").is_some())
            .collect();
        (s.len() >= 2).then_some(s)
    })
    .await;
    assert_eq!(
        (&sent[0]["recipient"], &sent[0]["text"]["body"]),
        (&json!(old), &json!("Hello"))
    );
    assert_eq!(
        (&sent[1]["recipient"], &sent[1]["text"]["body"]),
        (&json!(new), &json!("Welcome back")),
        "the state set under the old BSUID holds under the new one"
    );
}
