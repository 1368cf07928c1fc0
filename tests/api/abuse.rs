//! Issue #7: fault and abuse probes, each as a test that failed before the
//! fix. Slow bodies, empty secrets, growth caps, consent order, early
//! statuses.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::*;

/// How a raw connection ended.
#[derive(Debug)]
enum Ended {
    /// The server answered (status code) and/or closed.
    Answered(u16),
    Closed,
}

/// Open a raw connection to `addr`, send a request head declaring
/// `declared` body bytes, then `first` bytes of body, then (if `trickle`)
/// one byte every 200 ms. Returns how the server ended it, or `None` if it
/// kept the connection open for `patience`.
async fn slow_body(
    addr: &str,
    path: &str,
    declared: usize,
    first: usize,
    trickle: bool,
    patience: Duration,
) -> Option<Ended> {
    let host = addr.trim_start_matches("http://");
    let mut s = TcpStream::connect(host).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nX-Hub-Signature-256: sha256=00\r\nContent-Length: {declared}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let chunk = vec![b'x'; 64 * 1024];
    let mut sent = 0;
    while sent < first {
        let n = chunk.len().min(first - sent);
        if s.write_all(&chunk[..n]).await.is_err() {
            break;
        }
        sent += n;
    }
    let deadline = Instant::now() + patience;
    let mut buf = vec![0u8; 4096];
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        if Instant::now() > deadline {
            return None;
        }
        tokio::select! {
            read = s.read(&mut buf) => {
                return Some(match read {
                    Ok(n) if n >= 12 && buf.starts_with(b"HTTP/1.1 ") => {
                        let code = std::str::from_utf8(&buf[9..12]).unwrap().parse().unwrap();
                        Ended::Answered(code)
                    }
                    _ => Ended::Closed,
                });
            }
            _ = tick.tick() => {
                if trickle && s.write_all(b"x").await.is_err() {
                    return Some(Ended::Closed);
                }
            }
        }
    }
}

async fn metric(app: &TestApp, line_start: &str) -> f64 {
    metric_value(&app.metrics_text().await, line_start).unwrap_or(0.0)
}

/// #7.2: slow and stalled bodies are cut off at `body_timeout`, and the
/// router keeps answering signed webhooks meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_stalled_webhook_bodies_are_cut_off() {
    let app = spawn_with(Options {
        extra: "[http]\nbody_timeout = \"1s\"\n".into(),
        ..Options::default()
    })
    .await;
    // 20 clients trickling 10 bytes a time, 20 sending a first part and
    // then nothing.
    let spawn = |sent: usize, trickle: bool| {
        let addr = app.addr.clone();
        tokio::spawn(async move {
            let limit = Duration::from_secs(15);
            slow_body(&addr, "/webhook", 3_000_000, sent, trickle, limit).await
        })
    };
    let trickles: Vec<_> = (0..20).map(|_| spawn(10, true)).collect();
    let stalled: Vec<_> = (0..20).map(|_| spawn(100_000, false)).collect();
    // Meanwhile a real webhook is answered.
    app.say(ANA, "hi").await;
    for t in trickles.into_iter().chain(stalled) {
        let ended = t.await.unwrap();
        assert!(
            matches!(ended, Some(Ended::Answered(408) | Ended::Closed)),
            "a slow body must be cut off, got {ended:?}"
        );
    }
    assert!(metric(&app, "wa_router_webhooks_total{result=\"body_timeout\"}").await >= 1.0);
    app.say(BOB, "hi").await;
}

/// #7.2: unverified bytes buffered at once are bounded; a body over the
/// budget is refused at once (503 overloaded), not buffered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffered_unverified_bytes_are_bounded() {
    let app = spawn_with(Options {
        extra: "[http]\nbody_timeout = \"30s\"\nmax_buffered = \"4MB\"\n".into(),
        ..Options::default()
    })
    .await;
    let holder = {
        let addr = app.addr.clone();
        tokio::spawn(async move {
            slow_body(
                &addr,
                "/webhook",
                3_000_000,
                2_600_000,
                false,
                Duration::from_secs(40),
            )
            .await
        })
    };
    // Wait until the first body holds its share of the budget.
    wait_for(10, "the first body to be buffered", || async {
        (metric(&app, "wa_router_request_body_buffered_bytes").await >= 2_000_000.0).then_some(())
    })
    .await;
    let started = Instant::now();
    let second = slow_body(
        &app.addr,
        "/webhook",
        3_000_000,
        3_000_000,
        false,
        Duration::from_secs(20),
    )
    .await;
    assert!(
        matches!(second, Some(Ended::Answered(503) | Ended::Closed)),
        "{second:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "refused, not held until the body deadline"
    );
    assert!(metric(&app, "wa_router_webhooks_total{result=\"overloaded\"}").await >= 1.0);
    // Small signed webhooks still fit.
    app.say(ANA, "hi").await;
    holder.abort();
}

/// A text from `from` sent `ago` seconds before now.
fn text_at(from: &str, body: &str, ago: i64) -> serde_json::Value {
    let mut m = text(from, body);
    m["timestamp"] = serde_json::json!((now_s() - ago).to_string());
    m
}

const PINGS: &str = r#"
[[rule]]
name = "p1"
when = { text = "ping1" }
set_state = "p1"
[[rule]]
name = "p2"
when = { text = "ping2" }
set_state = "p2"
"#;

async fn wait_state(app: &TestApp, wa_id: &str, state: &str) -> serde_json::Value {
    wait_for(10, &format!("state {state}"), || async {
        app.conversation(wa_id)
            .await
            .filter(|c| c["state"] == state)
    })
    .await
}

/// #7.6: consent follows the time the customer sent the keyword, not the
/// order Meta delivers it in (a compliance defect).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_older_keyword_does_not_undo_a_newer_consent_change() {
    let app = spawn_app(PINGS).await;
    app.inbound(text_at(ANA, "START", 3600)).await;
    app.inbound(text_at(ANA, "STOP", 60)).await;
    // Meta retries an even older START after the STOP.
    app.inbound(text_at(ANA, "start", 7200)).await;
    app.say(ANA, "ping1").await;
    let c = wait_state(&app, ANA, "p1").await;
    assert_eq!(c["opted_out"], true, "the newest keyword (STOP) holds");
    // An opt-in by API (now) is not undone by a STOP sent 30 minutes ago.
    let (status, _) = app
        .api(
            reqwest::Method::DELETE,
            &format!("/v1/conversations/main/{ANA}/opt-out"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    app.inbound(text_at(ANA, "stop", 1800)).await;
    app.say(ANA, "ping2").await;
    let c = wait_state(&app, ANA, "p2").await;
    assert_eq!(c["opted_out"], false);
    // A newer keyword still works.
    app.say(ANA, "stop").await;
    wait_for(10, "the opt-out", || async {
        app.conversation(ANA)
            .await
            .filter(|c| c["opted_out"] == true)
    })
    .await;
}

/// #7.7: one API key cannot fill memory and disk through metadata, vars or
/// an ever-growing record store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_vars_and_records_are_capped() {
    let app = spawn_with(Options {
        account_extra: "max_records = 10\n".into(),
        pace: "0ms",
        ..Options::default()
    })
    .await;
    let big = "x".repeat(17 * 1024);
    let (status, body) = app
        .send(serde_json::json!({ "to": format!("+{ANA}"), "type": "template",
            "template": { "name": "t", "language": { "code": "en" } }, "metadata": { "blob": big } }))
        .await;
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (400, Some("metadata")),
        "{body}"
    );
    let (status, body) = app
        .api(
            reqwest::Method::PUT,
            &format!("/v1/conversations/main/{ANA}/state"),
            Some(serde_json::json!({ "vars": { "a": big } })),
        )
        .await;
    assert_eq!(
        (status, body["error"]["field"].as_str()),
        (400, Some("vars")),
        "{body}"
    );
    // Records: the oldest finished ones go once the account holds too many.
    let mut ids = Vec::new();
    for i in 0..30 {
        let (status, body) = app.send_template(ANA, &format!("cap{i}")).await;
        assert_eq!(status, 202, "{body}");
        ids.push(body["id"].as_str().unwrap().to_string());
        app.wait_status(ids.last().unwrap(), "sent").await;
    }
    // The archive drops them in its next commit (at once, not gathered).
    wait_for(
        10,
        "at most 11 records held with max_records = 10",
        || async {
            let (_, list) = app
                .api(reqwest::Method::GET, "/v1/messages?limit=200", None)
                .await;
            (list["messages"].as_array()?.len() <= 11).then_some(())
        },
    )
    .await;
    let (status, _) = app
        .api(
            reqwest::Method::GET,
            &format!("/v1/messages/{}", ids[29]),
            None,
        )
        .await;
    assert_eq!(status, 200, "the newest is kept");
    let (status, _) = app
        .api(
            reqwest::Method::GET,
            &format!("/v1/messages/{}", ids[0]),
            None,
        )
        .await;
    assert_eq!(status, 404, "the oldest finished is dropped");
    assert!(metric(&app, "wa_router_records_evicted_total").await >= 19.0);
}

/// #7.7: a dead target's backlog is bounded in bytes, oldest dropped first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_targets_backlog_is_capped_in_bytes() {
    let app = spawn_with(Options {
        routes: "[[rule]]\nname = \"all\"\nforward = \"agents\"\n".into(),
        targets: vec![("agents", "[\"message\"]\nmax_backlog = \"8KB\"")],
        ..Options::default()
    })
    .await;
    wiremock::Mock::given(wiremock::matchers::method("POST"))
        .respond_with(wiremock::ResponseTemplate::new(500))
        .with_priority(1)
        .mount(&app.targets["agents"])
        .await;
    for i in 0..40 {
        app.say(ANA, &format!("message number {i} {}", "y".repeat(500)))
            .await;
    }
    wait_for(10, "dropped events", || async {
        (metric(&app, "wa_router_event_deliveries_total{result=\"dropped\"}").await >= 1.0)
            .then_some(())
    })
    .await;
    let bytes = metric(&app, "wa_router_event_backlog_bytes{target=\"agents\"}").await;
    assert!(bytes <= 8192.0, "backlog holds {bytes} bytes");
    // Failed attempts come back for a retry: the bound holds for them too.
    wait_for(10, "retried events", || async {
        (metric(&app, "wa_router_event_deliveries_total{result=\"retry\"}").await >= 2.0)
            .then_some(())
    })
    .await;
    for i in 40..60 {
        app.say(ANA, &format!("message number {i} {}", "y".repeat(500)))
            .await;
        let bytes = metric(&app, "wa_router_event_backlog_bytes{target=\"agents\"}").await;
        assert!(bytes <= 8192.0, "backlog holds {bytes} bytes after retries");
    }
}

/// #7.8: phone number ids made up by whoever holds the sandbox app secret
/// register at most MAX_SANDBOX_ACCOUNTS accounts; ids never wrap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_accounts_are_capped() {
    let app = spawn_with(Options {
        live: false,
        ..Options::default()
    })
    .await;
    let max = wa_router::state::MAX_SANDBOX_ACCOUNTS;
    let entries: Vec<serde_json::Value> = (0..=max)
        .map(|i| {
            let mut n = notification(vec![text(ANA, "hi")], vec![]);
            n["entry"][0]["changes"][0]["value"]["metadata"]["phone_number_id"] =
                serde_json::json!(format!("{}", 900_000_000 + i));
            n["entry"][0].clone()
        })
        .collect();
    app.deliver(&serde_json::json!({ "object": "whatsapp_business_account", "entry": entries }))
        .await;
    let health: serde_json::Value = app.healthz().await;
    assert_eq!(
        health["accounts"],
        max + 1,
        "the configured one and {max} sandbox ones"
    );
    assert_eq!(
        metric(
            &app,
            "wa_router_webhooks_total{result=\"sandbox_account_refused\"}"
        )
        .await,
        1.0
    );
    let (status, body) = app
        .api(
            reqwest::Method::GET,
            &format!("/v1/conversations/{}/{ANA}", 900_000_000 + max),
            None,
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("unknown_account"))
    );
}

/// #7.3: a live config whose secrets come from variables set to "" does not
/// start (it used to start in sandbox mode with the public credentials).
#[test]
fn empty_secrets_from_the_environment_stop_startup() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("routes.toml"), "").unwrap();
    std::fs::write(
        dir.path().join("wa-router.toml"),
        "listen = \"127.0.0.1:0\"\ndata_dir = \"\"\n[meta]\napp_secret = \"${WA_T_SECRET}\"\nverify_token = \"${WA_T_VERIFY}\"\n[[accounts]]\nname = \"main\"\nphone_number_id = \"1\"\naccess_token = \"${WA_T_TOKEN}\"\n[api]\nkeys = [\"${WA_T_KEY}\"]\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wa-router"))
        .args(["serve", "-c", "wa-router.toml"])
        .current_dir(dir.path())
        .env("WA_T_SECRET", "")
        .env("WA_T_VERIFY", "")
        .env("WA_T_TOKEN", "")
        .env("WA_T_KEY", "")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("wa-router.toml:9:") && err.contains("access_token") && err.contains("empty"),
        "{err}"
    );
}
