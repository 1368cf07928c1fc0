//! SPEC §8 and §4: events to targets, forward and handoff.

use std::time::Duration;

use serde_json::json;
use wiremock::matchers::method;
use wiremock::{Mock, ResponseTemplate};

use crate::helpers::*;

const FORWARD: &str = r#"
[[rule]]
name = "sales"
when = { text = "sales" }
set_state = "with_sales"
forward = "agents"
handoff = true
send = [ { type = "text", body = "A sales rep will reply here shortly." } ]

[[rule]]
name = "fallback"
send = [ { type = "text", body = "bot: {{ message.text }}" } ]
"#;

fn agents() -> Vec<(&'static str, &'static str)> {
    vec![("agents", r#"["message", "status"]"#)]
}

#[tokio::test]
async fn forward_posts_a_signed_message_received_event() {
    let app = spawn_with(Options {
        routes: FORWARD.into(),
        targets: agents(),
        ..Options::default()
    })
    .await;
    let wamid = app.say(ANA, "sales").await;
    let events = app.wait_events("agents", "message.received", 1).await;
    let e = &events[0];
    assert_eq!(
        e.signature,
        sign(&e.raw, TARGET_SECRET),
        "X-Router-Signature-256 is the HMAC of the body"
    );
    assert_eq!(e.event_id, e.body["id"].as_str().unwrap());
    assert!(e.event_id.starts_with("evt_"));
    // The timestamped signature (replay protection) covers "{ts}.{body}".
    let ts: i64 = e
        .timestamp
        .parse()
        .expect("X-Router-Timestamp is unix seconds");
    assert!((now_s() - ts).abs() < 60);
    let mut signed = format!("{ts}.").into_bytes();
    signed.extend_from_slice(&e.raw);
    assert_eq!(e.timestamp_signature, sign(&signed, TARGET_SECRET));
    let b = &e.body;
    assert_eq!(b["account"], "main");
    assert_eq!(b["rule"], "sales");
    assert_eq!(b["contact"], json!({ "wa_id": ANA, "name": "Ana" }));
    assert_eq!(b["conversation"]["wa_id"], ANA);
    assert_eq!(b["conversation"]["state"], "with_sales");
    assert_eq!(b["conversation"]["handoff"], true);
    assert!(b["conversation"]["window_expires_at"].is_string());
    assert_eq!(b["message"]["id"], wamid.as_str());
    assert_eq!(b["message"]["type"], "text");
    assert_eq!(b["message"]["text"], "sales");
    assert_eq!(b["message"]["raw"]["text"]["body"], "sales");
}

#[tokio::test]
async fn a_handed_off_conversation_sends_every_message_to_targets_and_no_rule_answers() {
    let app = spawn_with(Options {
        routes: FORWARD.into(),
        targets: agents(),
        ..Options::default()
    })
    .await;
    app.say(ANA, "sales").await;
    app.wait_texts(ANA, 1).await;
    app.say(ANA, "when do you open?").await;
    let events = app.wait_events("agents", "message.received", 2).await;
    assert_eq!(events[1].body["message"]["text"], "when do you open?");
    assert!(events[1].body["rule"].is_null());
    // Consent keywords still work while handed off.
    app.say(ANA, "STOP").await;
    wait_for(10, "opt-out", || async {
        (app.conversation(ANA).await.unwrap()["opted_out"] == true).then_some(())
    })
    .await;
    app.flush().await;
    assert_eq!(
        app.texts_to(ANA).await,
        vec!["A sales rep will reply here shortly."]
    );
    // Give the conversation back: the bot answers again.
    app.api(
        reqwest::Method::DELETE,
        &format!("/v1/conversations/main/{ANA}/opt-out"),
        None,
    )
    .await;
    let (status, conv) = app
        .api(
            reqwest::Method::DELETE,
            &format!("/v1/conversations/main/{ANA}/handoff"),
            None,
        )
        .await;
    assert_eq!((status, &conv["handoff"]["active"]), (200, &json!(false)));
    app.say(ANA, "hello again").await;
    assert_eq!(app.wait_texts(ANA, 2).await[1], "bot: hello again");
}

#[tokio::test]
async fn a_failing_target_is_retried_with_the_same_event_id() {
    let targets = vec![("agents", r#"["message"]"#)];
    let app = spawn_with(Options {
        routes: FORWARD.into(),
        targets,
        ..Options::default()
    })
    .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(500))
        .up_to_n_times(2)
        .with_priority(1)
        .mount(&app.targets["agents"])
        .await;
    app.say(ANA, "sales").await;
    let tries = wait_for(15, "three deliveries", || async {
        let d: Vec<Delivered> = app
            .deliveries("agents")
            .await
            .into_iter()
            .filter(|d| d.body["event"] == "message.received")
            .collect();
        (d.len() >= 3).then_some(d)
    })
    .await;
    assert!(
        tries
            .iter()
            .all(|d| d.event_id == tries[0].event_id && d.raw == tries[0].raw),
        "same event, same id"
    );
    let metrics = app.metrics_text().await;
    assert!(
        metrics.contains("wa_router_event_deliveries_total{result=\"retry\"} 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_slow_target_delays_neither_replies_nor_other_targets() {
    let app = spawn_with(Options {
        routes: FORWARD.replace("forward = \"agents\"", "forward = [\"slow\", \"agents\"]"),
        targets: vec![("slow", r#"["message"]"#), ("agents", r#"["message"]"#)],
        ..Options::default()
    })
    .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_delay(Duration::from_secs(30)))
        .with_priority(1)
        .mount(&app.targets["slow"])
        .await;
    for who in [ANA, BOB] {
        app.say(who, "sales").await;
    }
    // Both replies and both events reach the fast side while the slow target hangs.
    app.wait_texts(ANA, 1).await;
    app.wait_texts(BOB, 1).await;
    app.wait_events("agents", "message.received", 2).await;
    let health = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn status_changes_reach_status_targets_with_tags_and_metadata() {
    let app = spawn_with(Options {
        routes: String::new(),
        targets: vec![("crm", r#"["status"]"#)],
        ..Options::default()
    })
    .await;
    let (_, sent) = app
        .send(json!({ "to": format!("+{ANA}"), "type": "template", "template": { "name": "receipt", "language": { "code": "en" } }, "tags": ["billing"], "metadata": { "crm_id": 42 } }))
        .await;
    let id = sent["id"].as_str().unwrap();
    let wamid = app.wait_status(id, "sent").await["wamid"]
        .as_str()
        .unwrap()
        .to_string();
    app.deliver(&notification(
        vec![],
        vec![status(&wamid, "delivered", ANA)],
    ))
    .await;
    let events = app.wait_events("crm", "message.status", 2).await;
    let statuses: Vec<&str> = events
        .iter()
        .map(|e| e.body["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, vec!["sent", "delivered"]);
    let e = &events[1].body;
    assert_eq!(e["message_id"], id);
    assert_eq!(e["wamid"], wamid.as_str());
    assert_eq!(e["to"], ANA);
    assert_eq!(e["tags"], json!(["billing"]));
    assert_eq!(e["metadata"], json!({ "crm_id": 42 }));
    assert_eq!(events[1].signature, sign(&events[1].raw, TARGET_SECRET));
}

#[tokio::test]
async fn events_for_a_target_that_refuses_connections_wait_in_a_visible_backlog() {
    // Port 1 on loopback refuses connections.
    let extra = "[targets.dead]\nurl = \"http://127.0.0.1:1/events\"\nsecret = \"s\"\nevents = [\"message\"]\n".to_string();
    let app = spawn_with(Options {
        routes: FORWARD.replace("forward = \"agents\"", "forward = [\"dead\", \"agents\"]"),
        targets: vec![("agents", r#"["message"]"#)],
        extra,
        ..Options::default()
    })
    .await;
    app.say(ANA, "sales").await;
    app.wait_events("agents", "message.received", 1).await;
    let metrics = wait_for(10, "the dead target's backlog", || async {
        let m = app.metrics_text().await;
        (m.contains("wa_router_event_backlog{target=\"dead\"} 1") && m.contains("result=\"retry\""))
            .then_some(m)
    })
    .await;
    assert!(
        metrics.contains("wa_router_event_backlog{target=\"agents\"} 0"),
        "{metrics}"
    );
    assert_eq!(
        app.wait_texts(ANA, 1).await,
        vec!["A sales rep will reply here shortly."]
    );
}
